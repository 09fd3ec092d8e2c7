// A gateway process and fio runs against it, for the benchmarks that drive
// whole gateways (bench-mirror.ts, bench-snapshots.ts), alone or as a primary
// and its replica.

import { ChildProcess, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { sh } from './corpus';

const ROOT = path.resolve(__dirname, '..', '..');
const BIN = path.join(ROOT, 'bin', 'blockgate');

export class Gw {
  private log = '';
  readonly proc: ChildProcess;
  readonly socket: string;

  constructor(
    readonly dir: string,
    args: string[],
  ) {
    this.socket = path.join(dir, 'nbd.sock');
    this.proc = spawn(
      process.execPath,
      [BIN, 'serve', '--data', path.join(dir, 'data'), '--listen', `unix:${this.socket}`, ...args],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    this.proc.stderr!.on('data', (c: Buffer) => (this.log += c.toString()));
  }

  async ready(): Promise<void> {
    for (let i = 0; !this.log.includes(' ready: '); i++) {
      if (i > 300 || this.proc.exitCode !== null) throw new Error(`gateway did not start:\n${this.log}`);
      await sleep(50);
    }
  }

  get replicationPort(): number {
    const m = /replication: gateway [0-9a-f]{32} listening on 127\.0\.0\.1:(\d+)/.exec(this.log);
    if (!m) throw new Error('no replication listener');
    return Number(m[1]);
  }

  cli(...args: string[]): string {
    return sh(process.execPath, [BIN, '--data', path.join(this.dir, 'data'), ...args], 120_000);
  }

  uri(volume: string): string {
    return `nbd+unix:///${volume}?socket=${this.socket}`;
  }

  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    if (this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    const exited = new Promise((r) => this.proc.once('exit', r));
    this.proc.kill(signal);
    const t = setTimeout(() => this.proc.kill('SIGKILL'), 60_000);
    await exited;
    clearTimeout(t);
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export function fio(
  uri: string,
  rw: string,
  bs: string,
  depth: number,
  extra: string[] = [],
): { iops: number; mbps: number } {
  // The working set defaults to 1 GiB; `extra` may set another --size (fio takes the last).
  const args = [
    '--size=1G',
    '--name=m',
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${rw}`,
    `--bs=${bs}`,
    `--iodepth=${depth}`,
    '--refill_buffers',
    '--buffer_compress_percentage=50',
    '--randrepeat=0',
    '--output-format=json',
    ...(rw.startsWith('rand') ? ['--norandommap'] : []),
    ...extra,
  ];
  const out = sh('fio', args, 30 * 60_000);
  type Side = { iops: number; bw_bytes: number };
  const job = (JSON.parse(out.slice(out.indexOf('{'))) as { jobs: Array<{ read: Side; write: Side }> })
    .jobs[0]!;
  const side = rw.includes('read') ? job.read : job.write;
  return { iops: side.iops, mbps: side.bw_bytes / 1e6 };
}

export interface MirrorState {
  state: string;
  lagBytes: number;
  sentBytes: number;
}

export function mirrors(gw: Gw, volume: string): MirrorState[] {
  return (JSON.parse(gw.cli('replica', 'list', volume, '--json')) as { replicas: MirrorState[] }).replicas;
}

/** Waits (bounded: 30 min) until every replica of `volume` is in sync; returns them. */
export async function inSync(gw: Gw, volume: string): Promise<MirrorState[]> {
  const deadline = Date.now() + 30 * 60_000;
  for (;;) {
    const ms = mirrors(gw, volume);
    // In sync, and durable there (no lag): a replica killed now loses nothing it acknowledged.
    if (ms.every((m) => m.state === 'in-sync' && m.lagBytes === 0)) return ms;
    if (Date.now() > deadline) throw new Error(`${volume} never got in sync: ${JSON.stringify(ms)}`);
    await sleep(200);
  }
}

export interface Pair {
  primary: Gw;
  replica: Gw;
  to: string;
  keyFile: string;
  root: string;
}

export async function startPair(root: string): Promise<Pair> {
  fs.mkdirSync(root, { recursive: true });
  const keyFile = path.join(root, 'cluster.key');
  fs.writeFileSync(keyFile, crypto.randomBytes(32), { mode: 0o600 });
  const primary = new Gw(path.join(root, 'primary'), ['--cluster-key', keyFile]);
  const replica = new Gw(path.join(root, 'replica'), [
    '--cluster-key',
    keyFile,
    '--replication-listen',
    '127.0.0.1:0',
  ]);
  await Promise.all([primary.ready(), replica.ready()]);
  return { primary, replica, to: `127.0.0.1:${replica.replicationPort}`, keyFile, root };
}

export async function stopPair(p: Pair): Promise<void> {
  await Promise.all([p.primary.stop(), p.replica.stop()]);
  fs.rmSync(p.root, { recursive: true, force: true });
}
