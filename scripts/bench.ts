// scripts/bench: fio's nbd engine against blockgate and its peers, in one run.
//
// Targets: blockgate's raw and memory backends, `nbdkit file` and `qemu-nbd` on the
// same kind of sparse file, and `nbdkit memory`. Each target gets a fresh server and
// a fresh sparse file, a sequential-write layout pass (so reads hit written data and
// random writes do not measure first allocation), then four time-based fio runs.
// Prints target × workload, the ratios the targets are judged by, PASS/FAIL per
// target, and writes the same as markdown under bench/results/.
//
// It is a measurement, not a test: it exits 0 when a target is missed and 1 only
// when a run itself failed. Every server and fio process is bounded in time and
// stopped on exit, error or Ctrl-C; temporary directories are removed.

import { ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { HEAP_FLAGS } from '../gateway/util/heap-flags';
import { formatSize, parseSize } from '../gateway/util/size';
import { cpuPerUnitUs, cpuSeconds, formatCpu } from './proc-cpu';

const ROOT = path.resolve(__dirname, '..', '..');
const BIN = path.join(ROOT, 'bin', 'blockgate');
const RESULTS_DIR = path.join(ROOT, 'bench', 'results');
const PROFILE_DIR = path.join(ROOT, 'bench', 'profiles');
const MiB = 2 ** 20;

// Every wait is bounded.
const READY_TIMEOUT_MS = 20_000;
const CLI_TIMEOUT_MS = 30_000;
const VERSION_TIMEOUT_MS = 10_000;
const FIO_SLACK_MS = 60_000; // beyond ramp + runtime
const LAYOUT_MIN_TIMEOUT_MS = 300_000;
const SERVER_STOP_GRACE_MS = 60_000; // the gateway flushes every volume on SIGTERM
const COMMAND_STOP_GRACE_MS = 5_000;
const KILL_WAIT_MS = 5_000;
const RSS_SAMPLE_MS = 200;
const OUTPUT_CAP = 4 * MiB;

// ---------------------------------------------------------------------------
// Options

const USAGE = `usage: scripts/bench [--quick] [--runtime SEC] [--ramp SEC] [--size SIZE] [--file-size SIZE]
                     [--rounds N] [--targets NAME,...] [--cpu-prof] [--no-save]
  --quick          fast sanity run: 2 s per workload, no ramp, 256 MiB of data
  --runtime SEC    seconds per time-based fio run (default 10; env BENCH_RUNTIME)
  --ramp SEC       fio ramp_time before measuring (default 2; env BENCH_RAMP)
  --size SIZE      fio's working set (default 1G; env BENCH_SIZE)
  --file-size SIZE size of each target's sparse file or memory disk (default 2G)
  --rounds N       run every target N times, report medians (default 1; env BENCH_ROUNDS)
  --targets LIST   comma-separated subset of: TARGETS (env BENCH_TARGETS)
  --cpu-prof       run the gateway under node --cpu-prof; profiles go to bench/profiles/
  --no-save        print only; write nothing under bench/results/
Full runs write bench/results/latest.md and a dated copy; --quick, --cpu-prof and
--targets runs write only a dated copy with a suffix, so latest.md stays a full run.`;

type TargetName =
  | 'blockgate-dedup'
  | 'blockgate-dedup-pool'
  | 'blockgate-raw'
  | 'blockgate-memory'
  | 'nbdkit-file'
  | 'qemu-nbd'
  | 'nbdkit-memory';
const TARGET_NAMES: TargetName[] = [
  'blockgate-dedup',
  'blockgate-dedup-pool',
  'blockgate-raw',
  'blockgate-memory',
  'nbdkit-file',
  'qemu-nbd',
  'nbdkit-memory',
];

interface Options {
  quick: boolean;
  runtime: number;
  ramp: number;
  size: number;
  fileSize: number;
  rounds: number;
  targets: TargetName[];
  cpuProf: boolean;
  save: boolean;
}

class UsageError extends Error {}

function size(text: string): number {
  try {
    return parseSize(text);
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}

function parseOptions(argv: string[]): Options {
  const env = process.env;
  const quick = argv.includes('--quick');
  const o: Options = {
    quick,
    runtime: Number(env.BENCH_RUNTIME ?? (quick ? 2 : 10)),
    ramp: Number(env.BENCH_RAMP ?? (quick ? 0 : 2)),
    size: size(env.BENCH_SIZE ?? (quick ? '256M' : '1G')),
    fileSize: 2 * 2 ** 30,
    rounds: Number(env.BENCH_ROUNDS ?? 1),
    targets: env.BENCH_TARGETS ? parseTargets(env.BENCH_TARGETS) : [...TARGET_NAMES],
    cpuProf: false,
    save: true,
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const eq = arg.indexOf('=');
    const name = eq > 0 ? arg.slice(0, eq) : arg;
    const value = (): string => {
      if (eq > 0) return arg.slice(eq + 1);
      const v = argv[++i];
      if (v === undefined) throw new UsageError(`${name} needs a value`);
      return v;
    };
    switch (name) {
      case '--quick':
        break;
      case '--runtime':
        o.runtime = Number(value());
        break;
      case '--ramp':
        o.ramp = Number(value());
        break;
      case '--size':
        o.size = size(value());
        break;
      case '--file-size':
        o.fileSize = size(value());
        break;
      case '--rounds':
        o.rounds = Number(value());
        break;
      case '--targets':
        o.targets = parseTargets(value());
        break;
      case '--cpu-prof':
        o.cpuProf = true;
        break;
      case '--no-save':
        o.save = false;
        break;
      case '-h':
      case '--help':
        process.stdout.write(USAGE.replace('TARGETS', TARGET_NAMES.join(', ')) + '\n');
        process.exit(0);
        break;
      default:
        throw new UsageError(`unknown argument '${arg}'`);
    }
  }
  if (!Number.isInteger(o.runtime) || o.runtime < 1)
    throw new UsageError('--runtime must be a whole number ≥ 1');
  if (!Number.isInteger(o.ramp) || o.ramp < 0) throw new UsageError('--ramp must be a whole number ≥ 0');
  if (!Number.isInteger(o.rounds) || o.rounds < 1)
    throw new UsageError('--rounds must be a whole number ≥ 1');
  if (o.size < 16 * MiB || o.size % MiB !== 0)
    throw new UsageError('--size must be a multiple of 1M, at least 16M');
  if (o.fileSize < o.size) throw new UsageError('--file-size must be at least --size');
  return o;
}

function parseTargets(list: string): TargetName[] {
  const names = list.split(',').map((s) => s.trim());
  for (const n of names) {
    if (!(TARGET_NAMES as string[]).includes(n)) {
      throw new UsageError(`unknown target '${n}': choose from ${TARGET_NAMES.join(', ')}`);
    }
  }
  return TARGET_NAMES.filter((n) => names.includes(n));
}

// ---------------------------------------------------------------------------
// Child processes: every one is tracked so that any exit path can stop it.

interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

const children = new Set<Child>();
let aborting = false;

class Child {
  readonly proc: ChildProcess;
  readonly exited: Promise<ExitStatus>;
  stdout = '';
  stderr = '';
  spawnError: Error | undefined;
  private status: ExitStatus | undefined;

  constructor(
    readonly label: string,
    cmd: string,
    args: string[],
    readonly stopGraceMs: number,
    env: NodeJS.ProcessEnv = process.env,
  ) {
    if (aborting) throw new Error('aborting');
    // Own process group: a Ctrl-C at the terminal reaches only this script, which
    // then stops each child itself (servers get SIGTERM and time to flush).
    this.proc = spawn(cmd, args, { env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    children.add(this);
    this.proc.stdout!.on('data', (c: Buffer) => (this.stdout = capped(this.stdout + c.toString())));
    this.proc.stderr!.on('data', (c: Buffer) => (this.stderr = capped(this.stderr + c.toString())));
    this.exited = new Promise((resolve) => {
      this.proc.on('error', (e) => {
        this.spawnError = e;
        this.status = { code: null, signal: null };
        children.delete(this);
        resolve(this.status);
      });
      // 'close', not 'exit': only then has all output been read.
      this.proc.on('close', (code, signal) => {
        this.status = { code, signal };
        children.delete(this);
        resolve(this.status);
      });
    });
  }

  get pid(): number | undefined {
    return this.proc.pid;
  }

  get running(): boolean {
    return this.status === undefined && this.proc.exitCode === null && this.proc.signalCode === null;
  }

  /** SIGTERM, then SIGKILL after the grace period; resolves once it has exited. */
  async stop(graceMs = this.stopGraceMs): Promise<ExitStatus & { killed: boolean }> {
    let killed = false;
    if (this.running) this.proc.kill('SIGTERM');
    const timer = setTimeout(() => {
      if (this.running) {
        killed = true;
        this.proc.kill('SIGKILL');
      }
    }, graceMs);
    const status = await Promise.race([this.exited, delay(graceMs + KILL_WAIT_MS).then(() => undefined)]);
    clearTimeout(timer);
    if (!status) throw new Error(`${this.label} (pid ${this.pid}) did not exit even after SIGKILL`);
    return { ...status, killed };
  }
}

function capped(s: string): string {
  return s.length > OUTPUT_CAP ? s.slice(s.length - OUTPUT_CAP / 2) : s;
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

interface CommandResult extends ExitStatus {
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

/** Runs a command to completion, killing it after `timeoutMs`. */
async function runCommand(
  label: string,
  cmd: string,
  args: string[],
  timeoutMs: number,
): Promise<CommandResult> {
  const child = new Child(label, cmd, args, COMMAND_STOP_GRACE_MS);
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    void child.stop().catch(() => undefined);
  }, timeoutMs);
  const status = await child.exited;
  clearTimeout(timer);
  if (child.spawnError) throw new Error(`cannot run ${cmd}: ${child.spawnError.message}`);
  return { ...status, stdout: child.stdout, stderr: child.stderr, timedOut };
}

function describeFailure(what: string, r: CommandResult): string {
  const how = r.timedOut ? 'timed out' : `exited ${r.code ?? r.signal}`;
  const tail = (s: string): string => s.trim().split('\n').slice(-15).join('\n');
  // fio prints its JSON report even when it fails; stderr says why.
  return `${what} ${how}\n${tail(r.stderr.trim() ? r.stderr : r.stdout)}`;
}

// ---------------------------------------------------------------------------
// Servers

interface Server {
  name: TargetName;
  uri: string;
  child: Child;
  /** The shell-style command, for the method section of the report. */
  command: string;
  profile?: string;
}

interface StartContext {
  dir: string;
  opts: Options;
  stamp: string;
}

/** Polls until the server answers NBD's greeting on `socket`. */
async function waitForNbd(child: Child, socket: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (true) {
    if (!child.running) {
      throw new Error(
        `${child.label} exited (${child.spawnError?.message ?? child.proc.exitCode ?? child.proc.signalCode}) before serving:\n${child.stderr.trim()}`,
      );
    }
    if (await greets(socket)) return;
    if (Date.now() > deadline)
      throw new Error(`${child.label} not serving on ${socket} after ${timeoutMs} ms`);
    await delay(50);
  }
}

function greets(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    const conn = net.connect(socket);
    let got = Buffer.alloc(0);
    const done = (ok: boolean): void => {
      clearTimeout(timer);
      conn.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), 2_000);
    conn.on('data', (c: Buffer) => {
      got = Buffer.concat([got, c]);
      if (got.length >= 8) done(got.subarray(0, 8).toString('latin1') === 'NBDMAGIC');
    });
    conn.on('error', () => done(false));
    conn.on('close', () => done(false));
  });
}

async function waitForLog(child: Child, pattern: RegExp, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!pattern.test(child.stderr)) {
    if (!child.running) throw new Error(`${child.label} exited before ${pattern}:\n${child.stderr.trim()}`);
    if (Date.now() > deadline)
      throw new Error(`${child.label}: no ${pattern} after ${timeoutMs} ms:\n${child.stderr}`);
    await delay(20);
  }
}

function makeSparseFile(file: string, size: number): void {
  const fd = fs.openSync(file, 'wx', 0o600);
  try {
    fs.ftruncateSync(fd, size);
  } finally {
    fs.closeSync(fd);
  }
}

async function startGateway(
  name: TargetName,
  backend: 'dedup' | 'raw' | 'memory',
  ctx: StartContext,
  serveArgs: string[] = [],
): Promise<Server> {
  const dataDir = path.join(ctx.dir, 'data');
  const socket = path.join(ctx.dir, 'nbd.sock');
  const nodeArgs: string[] = [];
  let profile: string | undefined;
  if (ctx.opts.cpuProf) {
    fs.mkdirSync(PROFILE_DIR, { recursive: true });
    const file = `${name}-${ctx.stamp}-${path.basename(ctx.dir).slice(name.length + 1)}.cpuprofile`;
    // Under a profiler `serve` does not execute itself again with its heap flags
    // (heap-flags.ts): given here, the profile is of the heap it runs with.
    nodeArgs.push(...HEAP_FLAGS, '--cpu-prof', `--cpu-prof-dir=${PROFILE_DIR}`, `--cpu-prof-name=${file}`);
    profile = path.join(PROFILE_DIR, file);
  }
  const args = [...nodeArgs, BIN, 'serve', '--data', dataDir, '--listen', `unix:${socket}`, ...serveArgs];
  const child = new Child(name, process.execPath, args, SERVER_STOP_GRACE_MS);
  const server: Server = {
    name,
    child,
    uri: `nbd+unix:///bench?socket=${socket}`,
    command: `node ${nodeArgs.join(' ')}${nodeArgs.length ? ' ' : ''}bin/blockgate serve --data DIR --listen unix:SOCK${serveArgs.map((a) => ` ${a}`).join('')}`,
    ...(profile ? { profile } : {}),
  };
  try {
    await waitForLog(child, / ready: /, READY_TIMEOUT_MS);
    const size = `${ctx.opts.fileSize / MiB}M`;
    const create = ['volume', 'create', 'bench', '--size', size, '--backend', backend];
    const r = await runCommand(
      'blockgate volume create',
      process.execPath,
      [BIN, '--data', dataDir, ...create],
      CLI_TIMEOUT_MS,
    );
    if (r.code !== 0) throw new Error(describeFailure(`blockgate ${create.join(' ')}`, r));
    server.command += ` (+ blockgate volume create bench --size ${size} --backend ${backend})`;
    return server;
  } catch (e) {
    await child.stop().catch(() => undefined);
    throw e;
  }
}

async function startPeer(
  name: TargetName,
  cmd: string,
  args: (socket: string, file: string) => string[],
  needsFile: boolean,
  ctx: StartContext,
): Promise<Server> {
  const socket = path.join(ctx.dir, 'nbd.sock');
  const file = path.join(ctx.dir, 'disk.img');
  if (needsFile) makeSparseFile(file, ctx.opts.fileSize);
  const argv = args(socket, file);
  const child = new Child(name, cmd, argv, SERVER_STOP_GRACE_MS);
  try {
    await waitForNbd(child, socket, READY_TIMEOUT_MS);
  } catch (e) {
    await child.stop().catch(() => undefined);
    throw e;
  }
  const command = [cmd, ...argv].join(' ').replace(socket, 'SOCK').replace(file, 'FILE');
  return { name, child, uri: `nbd+unix:///?socket=${socket}`, command };
}

const START: Record<TargetName, (ctx: StartContext) => Promise<Server>> = {
  'blockgate-dedup': (ctx) => startGateway('blockgate-dedup', 'dedup', ctx),
  // The encoding pool forced on for writes of 128 KiB and up, whatever the default on this machine.
  'blockgate-dedup-pool': (ctx) =>
    startGateway('blockgate-dedup-pool', 'dedup', ctx, ['--hash-pool', '128K']),
  'blockgate-raw': (ctx) => startGateway('blockgate-raw', 'raw', ctx),
  'blockgate-memory': (ctx) => startGateway('blockgate-memory', 'memory', ctx),
  'nbdkit-file': (ctx) => startPeer('nbdkit-file', 'nbdkit', (s, f) => ['-f', '-U', s, 'file', f], true, ctx),
  'qemu-nbd': (ctx) =>
    startPeer(
      'qemu-nbd',
      'qemu-nbd',
      (s, f) => ['-k', s, '-f', 'raw', '-t', '--cache=writeback', f],
      true,
      ctx,
    ),
  'nbdkit-memory': (ctx) =>
    startPeer(
      'nbdkit-memory',
      'nbdkit',
      (s) => ['-f', '-U', s, 'memory', `${ctx.opts.fileSize / MiB}M`],
      false,
      ctx,
    ),
};

/** Max VmRSS of a process, sampled from /proc while it runs. */
class RssSampler {
  maxBytes = 0;
  private readonly timer: NodeJS.Timeout;

  constructor(private readonly pid: number) {
    this.sample();
    this.timer = setInterval(() => this.sample(), RSS_SAMPLE_MS);
  }

  sample(): void {
    try {
      const m = /^VmRSS:\s+(\d+) kB/m.exec(fs.readFileSync(`/proc/${this.pid}/status`, 'utf8'));
      if (m) this.maxBytes = Math.max(this.maxBytes, Number(m[1]) * 1024);
    } catch {
      // Gone already; keep what was seen.
    }
  }

  stop(): void {
    this.sample();
    clearInterval(this.timer);
  }
}

// ---------------------------------------------------------------------------
// fio

type WorkloadId = 'randwrite' | 'randread' | 'seqwrite' | 'seqread';

interface Workload {
  id: WorkloadId;
  label: string;
  rw: string;
  bs: string;
  iodepth: number;
  dir: 'read' | 'write';
  unit: 'IOPS' | 'MB/s';
  /** blockgate-raw must reach this fraction of nbdkit-file. */
  need: number;
}

const WORKLOADS: Workload[] = [
  {
    id: 'randwrite',
    label: '4k randwrite',
    rw: 'randwrite',
    bs: '4k',
    iodepth: 32,
    dir: 'write',
    unit: 'IOPS',
    need: 0.6,
  },
  {
    id: 'randread',
    label: '4k randread',
    rw: 'randread',
    bs: '4k',
    iodepth: 32,
    dir: 'read',
    unit: 'IOPS',
    need: 0.6,
  },
  {
    id: 'seqwrite',
    label: '1M seq write',
    rw: 'write',
    bs: '1M',
    iodepth: 8,
    dir: 'write',
    unit: 'MB/s',
    need: 0.8,
  },
  {
    id: 'seqread',
    label: '1M seq read',
    rw: 'read',
    bs: '1M',
    iodepth: 8,
    dir: 'read',
    unit: 'MB/s',
    need: 0.8,
  },
];

interface Measurement {
  /** IOPS or MB/s (10^6 bytes), per the workload's unit. */
  value: number;
  /** 99th percentile completion latency, microseconds. */
  p99us: number;
  /**
   * The server's CPU time (all its threads, user and system) per unit of the workload:
   * microseconds per 4 KiB op, or per MB. NaN where /proc could not say.
   */
  cpuUs: number;
}

function fioArgs(
  name: string,
  uri: string,
  w: Omit<Workload, 'id' | 'label' | 'unit' | 'need'>,
  opts: Options,
  timed: boolean,
): string[] {
  const args = [
    `--name=${name}`,
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${w.rw}`,
    `--bs=${w.bs}`,
    `--iodepth=${w.iodepth}`,
    `--size=${opts.size}`,
    '--output-format=json',
    // Fresh, half-compressible contents for every write: without this fio repeats one
    // buffer, and a deduplicating target would only ever measure its hit path.
    '--refill_buffers',
    '--buffer_compress_percentage=50',
    // A new seed every run: with fio's fixed default, a timed write repeats the bytes of
    // the layout pass, and a deduplicating target would measure only its hit path.
    '--randrepeat=0',
  ];
  // A random map costs fio CPU that the servers would otherwise get on a small machine.
  if (w.rw.startsWith('rand')) args.push('--norandommap');
  if (timed) args.push('--time_based', `--runtime=${opts.runtime}`, `--ramp_time=${opts.ramp}`);
  return args;
}

interface FioSide {
  io_bytes: number;
  bw_bytes: number;
  iops: number;
  clat_ns?: { percentile?: Record<string, number> };
}

interface FioJob {
  jobname: string;
  error: number;
  read: FioSide;
  write: FioSide;
}

/** fio may print lines ("fio: connected to NBD server") before its JSON. */
function parseFioJson(stdout: string): FioJob {
  const start = stdout.indexOf('{');
  const end = stdout.lastIndexOf('}');
  if (start < 0 || end < start) throw new Error(`no JSON in fio output:\n${stdout.slice(0, 2000)}`);
  const doc = JSON.parse(stdout.slice(start, end + 1)) as { jobs?: FioJob[] };
  const job = doc.jobs?.[0];
  if (!job) throw new Error('fio JSON has no jobs');
  return job;
}

interface FioResult {
  iops: number;
  /** 10^6 bytes per second. */
  mbps: number;
  p99us: number;
  seconds: number;
}

async function fio(
  label: string,
  args: string[],
  dir: 'read' | 'write',
  timeoutMs: number,
): Promise<FioResult> {
  const t0 = Date.now();
  const r = await runCommand(`fio ${label}`, 'fio', args, timeoutMs);
  if (r.code !== 0 || r.timedOut) throw new Error(describeFailure(`fio ${label}`, r));
  const job = parseFioJson(r.stdout);
  if (job.error !== 0) throw new Error(`fio ${label}: job error ${job.error}\n${r.stderr.trim()}`);
  const side = job[dir];
  if (!side || !(side.io_bytes > 0)) throw new Error(`fio ${label}: no ${dir} I/O was done`);
  return {
    iops: side.iops,
    mbps: side.bw_bytes / 1e6,
    p99us: (side.clat_ns?.percentile?.['99.000000'] ?? NaN) / 1000,
    seconds: (Date.now() - t0) / 1000,
  };
}

// ---------------------------------------------------------------------------
// One target

interface TargetRun {
  results: Map<WorkloadId, Measurement>;
  rssMax: number;
  warnings: string[];
  command: string;
  profile?: string;
}

function progress(msg: string): void {
  process.stderr.write(msg + '\n');
}

async function runTarget(
  name: TargetName,
  opts: Options,
  tmpRoot: string,
  stamp: string,
): Promise<TargetRun> {
  const dir = fs.mkdtempSync(path.join(tmpRoot, `${name}-`));
  const run: TargetRun = { results: new Map(), rssMax: 0, warnings: [], command: '' };
  let server: Server | undefined;
  let rss: RssSampler | undefined;
  try {
    server = await START[name]({ dir, opts, stamp });
    run.command = server.command;
    if (server.profile) run.profile = server.profile;
    rss = new RssSampler(server.child.pid!);

    const layout = { rw: 'write', bs: '1M', iodepth: 8, dir: 'write' as const };
    const layoutTimeout = Math.max(LAYOUT_MIN_TIMEOUT_MS, (opts.size / MiB) * 1000); // ≥ 1 MiB/s
    const l = await fio('layout', fioArgs('layout', server.uri, layout, opts, false), 'write', layoutTimeout);
    progress(`  layout: ${formatSize(opts.size)} sequential write in ${l.seconds.toFixed(1)} s`);

    for (const w of WORKLOADS) {
      const timeout = (opts.ramp + opts.runtime) * 1000 + FIO_SLACK_MS;
      const cpu0 = cpuSeconds(server.child.pid!);
      const m = await fio(w.id, fioArgs(w.id, server.uri, w, opts, true), w.dir, timeout);
      const cpu = cpuSeconds(server.child.pid!) - cpu0;
      const value = w.unit === 'IOPS' ? m.iops : m.mbps;
      const cpuUs = cpuPerUnitUs(cpu, value, opts.ramp + opts.runtime);
      run.results.set(w.id, { value, p99us: m.p99us, cpuUs });
      progress(
        `  ${w.label.padEnd(13)} ${fmtValue(value, w.unit).padStart(9)} ${w.unit.padEnd(4)}  p99 ${fmtLatency(m.p99us)}` +
          `  server CPU ${fmtCpu(cpuUs, w.unit)}`,
      );
    }
  } catch (e) {
    if (server && !server.child.running) {
      const how = server.child.proc.exitCode ?? server.child.proc.signalCode;
      const log = server.child.stderr.trim().split('\n').slice(-10).join('\n');
      throw new Error(
        `${name} server exited (${how}) during the run; ${(e as Error).message}\nserver log:\n${log}`,
      );
    }
    throw e;
  } finally {
    rss?.stop();
    if (rss) run.rssMax = rss.maxBytes;
    if (server) {
      const st = await server.child.stop();
      const isGateway = name.startsWith('blockgate');
      if (st.killed) run.warnings.push(`${name} needed SIGKILL to stop`);
      else if (isGateway && st.code !== 0)
        run.warnings.push(`${name} exited ${st.code ?? st.signal} on SIGTERM`);
      if (isGateway) {
        const noisy = server.child.stderr.split('\n').filter((l) => / (warn|error) /.test(l));
        if (noisy.length) {
          run.warnings.push(`${name} logged ${noisy.length} warning/error line(s), first: ${noisy[0]}`);
        }
      }
      if (server.profile && !fs.existsSync(server.profile)) {
        run.warnings.push(`${name}: no CPU profile was written`);
        delete run.profile;
      }
    }
    fs.rmSync(dir, { recursive: true, force: true });
  }
  if (rss) progress(`  max RSS ${fmtMiB(run.rssMax)}`);
  return run;
}

// ---------------------------------------------------------------------------
// Report

interface Summary {
  values: Map<TargetName, Map<WorkloadId, Measurement>>;
  rss: Map<TargetName, number>;
  errors: Map<TargetName, string>;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

function fmtValue(v: number | undefined, unit: 'IOPS' | 'MB/s'): string {
  if (v === undefined || !Number.isFinite(v)) return '—';
  if (unit === 'IOPS') return Math.round(v).toLocaleString('en-US');
  return v >= 100 ? Math.round(v).toLocaleString('en-US') : v.toFixed(1);
}

function fmtLatency(us: number | undefined): string {
  if (us === undefined || !Number.isFinite(us)) return '—';
  return us >= 1000 ? `${(us / 1000).toFixed(2)} ms` : `${Math.round(us)} µs`;
}

/** Server CPU per 4 KiB op (µs) or per MB (ms). */
function fmtCpu(us: number | undefined, unit: 'IOPS' | 'MB/s'): string {
  return formatCpu(us, unit === 'IOPS' ? 'op' : 'MB');
}

function fmtMiB(bytes: number | undefined): string {
  return bytes === undefined || bytes === 0 ? '—' : `${Math.round(bytes / MiB)} MiB`;
}

function fmtRatio(r: number | undefined): string {
  return r === undefined || !Number.isFinite(r) ? '—' : `${r.toFixed(2)}×`;
}

const RATIOS: Array<{ label: string; num: TargetName; den: TargetName }> = [
  { label: 'blockgate-raw / nbdkit-file', num: 'blockgate-raw', den: 'nbdkit-file' },
  { label: 'blockgate-raw / qemu-nbd', num: 'blockgate-raw', den: 'qemu-nbd' },
  { label: 'blockgate-memory / nbdkit-memory', num: 'blockgate-memory', den: 'nbdkit-memory' },
  { label: 'blockgate-dedup / blockgate-raw', num: 'blockgate-dedup', den: 'blockgate-raw' },
  { label: 'blockgate-dedup-pool / blockgate-dedup', num: 'blockgate-dedup-pool', den: 'blockgate-dedup' },
];

/** The dedup store's targets against the raw backend (issue 3): writes ≥ 0.5×, reads ≥ 0.8×. */
const DEDUP_NEED: Record<string, number> = { randwrite: 0.5, randread: 0.8, seqwrite: 0.5, seqread: 0.8 };

const RSS_LIMIT = 300 * MiB;

function ratio(s: Summary, num: TargetName, den: TargetName, w: WorkloadId): number | undefined {
  const a = s.values.get(num)?.get(w)?.value;
  const b = s.values.get(den)?.get(w)?.value;
  return a !== undefined && b !== undefined && b > 0 ? a / b : undefined;
}

interface Check {
  what: string;
  need: string;
  got: string;
  verdict: 'PASS' | 'FAIL' | 'n/a';
}

function checks(s: Summary): Check[] {
  const out: Check[] = WORKLOADS.map((w) => {
    const r = ratio(s, 'blockgate-raw', 'nbdkit-file', w.id);
    return {
      what: `${w.label}: blockgate-raw vs nbdkit-file`,
      need: `≥ ${w.need.toFixed(1)}×`,
      got: fmtRatio(r),
      verdict: r === undefined ? 'n/a' : r >= w.need ? 'PASS' : 'FAIL',
    };
  });
  for (const w of WORKLOADS) {
    const r = ratio(s, 'blockgate-dedup', 'blockgate-raw', w.id);
    const need = DEDUP_NEED[w.id] ?? 0.5;
    out.push({
      what: `${w.label}: blockgate-dedup vs blockgate-raw`,
      need: `≥ ${need.toFixed(1)}×`,
      got: fmtRatio(r),
      verdict: r === undefined ? 'n/a' : r >= need ? 'PASS' : 'FAIL',
    });
  }
  const rss = s.rss.get('blockgate-raw');
  out.push({
    what: 'gateway max RSS (blockgate-raw)',
    need: `< ${RSS_LIMIT / MiB} MiB`,
    got: fmtMiB(rss),
    verdict: !rss ? 'n/a' : rss < RSS_LIMIT ? 'PASS' : 'FAIL',
  });
  return out;
}

interface Table {
  head: string[];
  rows: string[][];
}

function resultsTable(s: Summary, targets: TargetName[]): Table {
  return {
    head: ['target', ...WORKLOADS.map((w) => `${w.label} (${w.unit})`), 'max RSS'],
    rows: targets.map((t) => {
      if (s.errors.has(t)) return [t, ...WORKLOADS.map(() => 'FAILED'), fmtMiB(s.rss.get(t))];
      const m = s.values.get(t);
      return [t, ...WORKLOADS.map((w) => fmtValue(m?.get(w.id)?.value, w.unit)), fmtMiB(s.rss.get(t))];
    }),
  };
}

function ratioTable(s: Summary): Table {
  return {
    head: ['ratio', ...WORKLOADS.map((w) => w.label)],
    rows: RATIOS.map((r) => [r.label, ...WORKLOADS.map((w) => fmtRatio(ratio(s, r.num, r.den, w.id)))]),
  };
}

function latencyTable(s: Summary, targets: TargetName[]): Table {
  return {
    head: ['target', ...WORKLOADS.map((w) => w.label)],
    rows: targets.map((t) => [t, ...WORKLOADS.map((w) => fmtLatency(s.values.get(t)?.get(w.id)?.p99us))]),
  };
}

function cpuTable(s: Summary, targets: TargetName[]): Table {
  return {
    head: ['target', ...WORKLOADS.map((w) => `${w.label} (${w.unit === 'IOPS' ? 'per op' : 'per MB'})`)],
    rows: targets.map((t) => [t, ...WORKLOADS.map((w) => fmtCpu(s.values.get(t)?.get(w.id)?.cpuUs, w.unit))]),
  };
}

function checkTable(cs: Check[]): Table {
  return {
    head: ['target', 'need', 'got', 'result'],
    rows: cs.map((c) => [c.what, c.need, c.got, c.verdict]),
  };
}

function plain(t: Table): string {
  const widths = t.head.map((h, i) => Math.max(h.length, ...t.rows.map((r) => r[i]!.length)));
  const line = (cells: string[]): string =>
    cells
      .map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!)))
      .join('  ')
      .trimEnd();
  return [line(t.head), ...t.rows.map(line)].join('\n');
}

function markdown(t: Table): string {
  const line = (cells: string[]): string => `| ${cells.join(' | ')} |`;
  const sep = t.head.map((_, i) => (i === 0 ? '---' : '---:'));
  return [line(t.head), line(sep), ...t.rows.map(line)].join('\n');
}

// ---------------------------------------------------------------------------
// Machine

interface Machine {
  date: Date;
  nproc: number;
  cpu: string;
  memory: string;
  kernel: string;
  node: string;
  fio: string;
  nbdkit: string;
  qemuNbd: string;
  commit: string;
  loadStart: string;
  loadEnd?: string;
}

async function version(cmd: string, args: string[]): Promise<string> {
  try {
    const r = await runCommand(`${cmd} --version`, cmd, args, VERSION_TIMEOUT_MS);
    return r.code === 0 ? (r.stdout.trim().split('\n')[0] ?? '?') : `? (${cmd} exited ${r.code ?? r.signal})`;
  } catch {
    return 'not installed';
  }
}

function loadAverage(): string {
  return os
    .loadavg()
    .map((l) => l.toFixed(2))
    .join(' ');
}

async function machine(): Promise<Machine> {
  const git = await runCommand(
    'git',
    'git',
    ['-C', ROOT, 'rev-parse', '--short', 'HEAD'],
    VERSION_TIMEOUT_MS,
  ).catch(() => undefined);
  const dirty = await runCommand(
    'git',
    'git',
    // The results this bench writes (bench/results/) are not changes to what it measures.
    ['-C', ROOT, 'status', '--porcelain', '--', '.', ':!bench/results'],
    VERSION_TIMEOUT_MS,
  ).catch(() => undefined);
  const commit =
    git?.code === 0
      ? git.stdout.trim() + (dirty?.stdout.trim() ? ' (with uncommitted changes)' : '')
      : 'unknown';
  return {
    date: new Date(),
    nproc: os.availableParallelism(),
    cpu: os.cpus()[0]?.model.trim() ?? 'unknown',
    memory: formatSize(os.totalmem()),
    kernel: `${os.type()} ${os.release()}`,
    node: process.version,
    fio: await version('fio', ['--version']),
    nbdkit: await version('nbdkit', ['--version']),
    qemuNbd: await version('qemu-nbd', ['--version']),
    commit,
    loadStart: loadAverage(),
  };
}

function stampOf(d: Date): string {
  const p = (n: number): string => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}-${p(d.getHours())}${p(d.getMinutes())}`;
}

function modeOf(opts: Options): string {
  const parts = [opts.quick ? 'quick' : 'full'];
  if (opts.cpuProf) parts.push('cpu-prof (gateway under the profiler: figures include its overhead)');
  if (opts.targets.length !== TARGET_NAMES.length) parts.push(`targets ${opts.targets.join(', ')}`);
  return parts.join(', ');
}

function renderMarkdown(
  opts: Options,
  m: Machine,
  s: Summary,
  runs: Map<TargetName, TargetRun[]>,
  notes: string[],
): string {
  const cs = checks(s);
  const commands = opts.targets.map((t) => `- ${t}: \`${runs.get(t)?.[0]?.command || '(did not start)'}\``);
  return [
    '# blockgate benchmark',
    '',
    `- date: ${m.date.toISOString()}`,
    `- mode: ${modeOf(opts)}`,
    `- machine: ${m.nproc} CPUs (${m.cpu}), ${m.memory} RAM, ${m.kernel}; load average (1/5/15 min) ${m.loadStart} at start, ${m.loadEnd ?? '?'} at end`,
    `- software: node ${m.node}, ${m.fio}, ${m.nbdkit}, ${m.qemuNbd}; blockgate ${m.commit}` +
      (process.env.UV_THREADPOOL_SIZE ? `; UV_THREADPOOL_SIZE=${process.env.UV_THREADPOOL_SIZE}` : ''),
    `- fio: nbd engine, one connection, ${opts.runtime} s per run after ${opts.ramp} s ramp, ${formatSize(opts.size)} working set on ${formatSize(opts.fileSize)} targets` +
      (opts.rounds > 1 ? `, median of ${opts.rounds} rounds` : ''),
    '',
    '## Results',
    '',
    'IOPS for 4 KiB random I/O at iodepth 32; MB/s (10⁶ bytes) for 1 MiB sequential I/O at iodepth 8.',
    'max RSS is the server process, sampled every 200 ms (the memory targets hold their data in RSS).',
    '',
    markdown(resultsTable(s, opts.targets)),
    '',
    '## Ratios',
    '',
    markdown(ratioTable(s)),
    '',
    '## Targets',
    '',
    markdown(checkTable(cs)),
    '',
    '## p99 completion latency',
    '',
    markdown(latencyTable(s, opts.targets)),
    '',
    '## Server CPU per operation',
    '',
    "The server process's CPU time (all threads, user and system, from /proc) over each fio run,",
    'ramp included, per 4 KiB op or per MB (10⁶ bytes) of 1 MiB I/O. It moves less between runs',
    'than throughput on a shared machine, and it is what each server costs: fio, and the kernel',
    "work done in fio's system calls, are not in it. Background work a workload leaves behind (a",
    "checkpoint, the compactor's pass over what a rewrite killed) counts in the next one's.",
    '',
    markdown(cpuTable(s, opts.targets)),
    '',
    '## Method',
    '',
    'Each target runs in turn with a fresh server on a Unix socket and a fresh sparse file (or memory disk).',
    `Preparation, identical for every target: one sequential 1 MiB write pass over the ${formatSize(opts.size)} working set,`,
    'so reads hit written data and random writes do not measure first allocation. Then, in order:',
    '',
    ...WORKLOADS.map((w) => `- ${w.label}: \`fio ${fioArgs(w.id, 'URI', w, opts, true).join(' ')}\``),
    '',
    'Servers:',
    '',
    ...commands,
    ...(notes.length ? ['', '## Notes', '', ...notes.map((n) => `- ${n}`)] : []),
    '',
  ].join('\n');
}

// ---------------------------------------------------------------------------
// Main

let tmpRoot: string | undefined;

function removeTmpRoot(): void {
  if (tmpRoot) fs.rmSync(tmpRoot, { recursive: true, force: true });
  tmpRoot = undefined;
}

async function stopEverything(): Promise<void> {
  await Promise.all([...children].map((c) => c.stop().catch(() => undefined)));
  removeTmpRoot();
}

async function main(): Promise<number> {
  const opts = parseOptions(process.argv.slice(2));
  if (!fs.existsSync(path.join(ROOT, 'dist', 'gateway', 'cli', 'main.js'))) {
    throw new Error('blockgate is not built: run `npx tsc -p .` (scripts/bench does this)');
  }
  const m = await machine();
  const needed = new Set([
    'fio',
    ...opts.targets.map((t) => (t.startsWith('nbdkit') ? 'nbdkit' : t === 'qemu-nbd' ? 'qemu-nbd' : '')),
  ]);
  const missing = [
    ['fio', m.fio],
    ['nbdkit', m.nbdkit],
    ['qemu-nbd', m.qemuNbd],
  ].filter(([cmd, v]) => needed.has(cmd!) && v === 'not installed');
  if (missing.length) {
    throw new Error(
      `missing ${missing.map(([c]) => c).join(', ')}: run scripts/install-test-deps (apt-get install -y fio nbdkit qemu-utils)`,
    );
  }

  const stamp = stampOf(m.date);
  tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-bench-'));
  progress(
    `blockgate bench (${modeOf(opts)}): ${opts.targets.length} targets × ${WORKLOADS.length} workloads, ` +
      `${opts.runtime} s + ${opts.ramp} s ramp each, ${formatSize(opts.size)} of ${formatSize(opts.fileSize)}, ` +
      `${opts.rounds} round(s); load average ${m.loadStart}`,
  );

  const runs = new Map<TargetName, TargetRun[]>();
  const summary: Summary = { values: new Map(), rss: new Map(), errors: new Map() };
  const notes: string[] = [];
  for (let round = 1; round <= opts.rounds; round++) {
    for (const [i, t] of opts.targets.entries()) {
      if (summary.errors.has(t)) continue;
      progress(`[${opts.rounds > 1 ? `round ${round}, ` : ''}${i + 1}/${opts.targets.length}] ${t}`);
      try {
        const r = await runTarget(t, opts, tmpRoot, stamp);
        runs.set(t, [...(runs.get(t) ?? []), r]);
        for (const w of r.warnings) {
          progress(`  warning: ${w}`);
          notes.push(w);
        }
      } catch (e) {
        if (aborting) throw e;
        const msg = (e as Error).message;
        progress(`  FAILED: ${msg}`);
        summary.errors.set(t, msg.split('\n')[0]!);
        notes.push(`${t} FAILED: ${msg.split('\n')[0]}`);
      }
    }
  }
  m.loadEnd = loadAverage();

  for (const [t, rs] of runs) {
    const per = new Map<WorkloadId, Measurement>();
    for (const w of WORKLOADS) {
      const ms = rs.map((r) => r.results.get(w.id)).filter((x): x is Measurement => x !== undefined);
      if (ms.length)
        per.set(w.id, {
          value: median(ms.map((x) => x.value)),
          p99us: median(ms.map((x) => x.p99us)),
          cpuUs: median(ms.map((x) => x.cpuUs).filter((x) => !Number.isNaN(x))),
        });
    }
    summary.values.set(t, per);
    summary.rss.set(t, Math.max(...rs.map((r) => r.rssMax)));
  }
  const profiles = [...runs.values()].flat().flatMap((r) => (r.profile ? [r.profile] : []));
  if (profiles.length) notes.push(`CPU profiles: ${profiles.map((p) => path.relative(ROOT, p)).join(', ')}`);

  const out: string[] = [
    '',
    `blockgate bench — ${m.date.toISOString()} — ${modeOf(opts)}`,
    `${m.nproc} CPUs, ${m.kernel}, node ${m.node}, ${m.fio}, ${m.nbdkit}, ${m.qemuNbd}, blockgate ${m.commit}`,
    `load average ${m.loadStart} at start, ${m.loadEnd} at end`,
    '',
    plain(resultsTable(summary, opts.targets)),
    '',
    plain(ratioTable(summary)),
    '',
    'p99 completion latency',
    plain(latencyTable(summary, opts.targets)),
    '',
    'server CPU per 4 KiB op / per MB',
    plain(cpuTable(summary, opts.targets)),
    '',
    ...checks(summary).map((c) => `${c.verdict.padEnd(4)}  ${c.what}: ${c.got} (need ${c.need})`),
    ...(notes.length ? ['', ...notes.map((n) => `note: ${n}`)] : []),
  ];

  if (opts.save) {
    fs.mkdirSync(RESULTS_DIR, { recursive: true });
    const partial = opts.quick || opts.cpuProf || opts.targets.length !== TARGET_NAMES.length;
    const suffix = [
      opts.quick ? '-quick' : '',
      opts.cpuProf ? '-cpuprof' : '',
      partial && !opts.quick && !opts.cpuProf ? '-partial' : '',
    ].join('');
    const md = renderMarkdown(opts, m, summary, runs, notes);
    const files = [path.join(RESULTS_DIR, `${stamp}${suffix}.md`)];
    if (!partial && summary.errors.size === 0) files.push(path.join(RESULTS_DIR, 'latest.md'));
    for (const f of files) fs.writeFileSync(f, md);
    out.push('', `wrote ${files.map((f) => path.relative(ROOT, f)).join(' and ')}`);
  }
  process.stdout.write(out.join('\n') + '\n');
  return summary.errors.size ? 1 : 0;
}

function onSignal(sig: NodeJS.Signals): void {
  const code = sig === 'SIGINT' ? 130 : 143;
  if (aborting) {
    for (const c of children) c.proc.kill('SIGKILL');
    removeTmpRoot();
    process.exit(code);
  }
  aborting = true;
  progress(`\n${sig}: stopping servers and removing temporary files (again to force)`);
  void stopEverything().finally(() => process.exit(code));
}

process.on('SIGINT', onSignal);
process.on('SIGTERM', onSignal);
process.on('SIGHUP', onSignal);
// Last resort if anything exits the process without the paths above.
process.on('exit', () => {
  for (const c of children) if (c.running) c.proc.kill('SIGKILL');
  removeTmpRoot();
});

main().then(
  async (code) => {
    await stopEverything();
    process.exit(code);
  },
  async (e: unknown) => {
    if (aborting) return; // the signal handler finishes up
    progress(
      e instanceof UsageError
        ? `scripts/bench: ${e.message}\n${USAGE.replace('TARGETS', TARGET_NAMES.join(', '))}`
        : `scripts/bench: ${(e as Error).stack ?? e}`,
    );
    await stopEverything();
    process.exit(e instanceof UsageError ? 2 : 1);
  },
);
