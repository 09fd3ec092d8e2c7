// `scripts/bench mirror [--quick]`: what mirroring costs, on loopback, between
// two gateway processes of one cluster (issue 4's benchmarks):
//
//   throughput  fio 4k randwrite QD32 and 1M sequential write QD8 on a dedup
//               volume with no replica, one async and one sync replica, in
//               one run, with ratios against no replica;
//   wire        ten volumes written from one ext4 image with ~2% changed
//               differently in each (scripts/corpus.ts), mirrored as they are
//               written: bytes on the links against the logical bytes and
//               the ideal (unique non-zero blocks after lz4);
//   resync      a replica down while 5% of a volume's blocks change (random
//               4k writes of fresh data), then back: bytes and time of the
//               resync against the changed data, for a 1 GiB and a 4 GiB
//               volume.
//
// `--rounds N` runs the three throughput configurations N times, alternating,
// and reports medians: one run of each is at the mercy of this machine's spread
// (±15-30% from one run to the next).
//
// A measurement, not a test: exits 0 whatever the figures, 1 if a run failed.
// Writes bench/results/mirror-latest.md.

import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { buildCorpusImage, changedVolume, IdealBytes, IMAGE, sh, VOLUMES } from './corpus';
import { fio, Gw, inSync, mirrors, Pair, startPair, stopPair } from './bench-gateway';
import { cpuPerUnitUs, cpuSeconds, formatCpu } from './proc-cpu';

const MiB = 1 << 20;
const GiB = 1 << 30;
const ROOT = path.resolve(__dirname, '..', '..');
const RESULTS = path.join(ROOT, 'bench', 'results');

const quick = process.argv.includes('--quick');
const roundsAt = process.argv.indexOf('--rounds');
const ROUNDS = roundsAt < 0 ? 1 : Number(process.argv[roundsAt + 1]);
if (!Number.isInteger(ROUNDS) || ROUNDS < 1 || ROUNDS > 9) {
  process.stderr.write('bench mirror: --rounds takes a whole number from 1 to 9\n');
  process.exit(2);
}
const RUNTIME = quick ? 3 : 10;
const RAMP = quick ? 0 : 2;

const timed = ['--time_based', `--runtime=${RUNTIME}`, `--ramp_time=${RAMP}`];

const CONFIGS = ['none', 'async', 'sync'] as const;

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

interface Run {
  iops: number;
  mbps: number;
  /** Both gateways' CPU time, microseconds per 4 KiB write and per MB of 1 MiB writes. */
  cpu4k: number;
  cpu1m: number;
}

/** Runs fio and returns its figures with both gateways' CPU seconds over the run. */
function measured(
  pair: Pair,
  run: () => { iops: number; mbps: number },
): { iops: number; mbps: number; cpu: number } {
  const pids = [pair.primary.proc.pid!, pair.replica.proc.pid!];
  const before = pids.map(cpuSeconds);
  const r = run();
  const cpu = pids.reduce((sum, pid, i) => sum + cpuSeconds(pid) - before[i]!, 0);
  return { ...r, cpu };
}

async function throughputRun(tmp: string, config: string, round: number): Promise<Run> {
  const pair = await startPair(path.join(tmp, `tp-${config}-${round}`));
  try {
    pair.primary.cli('volume', 'create', 'bench', '--size', '2G');
    if (config !== 'none') {
      pair.primary.cli('replica', 'add', 'bench', '--to', pair.to, '--mode', config);
      await inSync(pair.primary, 'bench');
    }
    const uri = pair.primary.uri('bench');
    const tag = ROUNDS > 1 ? ` (round ${round + 1} of ${ROUNDS})` : '';
    process.stderr.write(`mirror bench: ${config}: 4k randwrite${tag}\n`);
    const r4k = measured(pair, () => fio(uri, 'randwrite', '4k', 32, timed));
    process.stderr.write(`mirror bench: ${config}: 1M write${tag}\n`);
    const r1m = measured(pair, () => fio(uri, 'write', '1M', 8, timed));
    return {
      iops: r4k.iops,
      mbps: r1m.mbps,
      cpu4k: cpuPerUnitUs(r4k.cpu, r4k.iops, RUNTIME + RAMP),
      cpu1m: cpuPerUnitUs(r1m.cpu, r1m.mbps, RUNTIME + RAMP),
    };
  } finally {
    await stopPair(pair);
  }
}

async function throughput(tmp: string): Promise<string[]> {
  const runs = new Map<string, Run[]>(CONFIGS.map((c) => [c, []]));
  for (let round = 0; round < ROUNDS; round++)
    for (const config of CONFIGS) runs.get(config)!.push(await throughputRun(tmp, config, round));
  const rows = CONFIGS.map((config) => {
    const rs = runs.get(config)!;
    return {
      config,
      iops: median(rs.map((r) => r.iops)),
      mbps: median(rs.map((r) => r.mbps)),
      cpu4k: median(rs.map((r) => r.cpu4k).filter((x) => !Number.isNaN(x))),
      cpu1m: median(rs.map((r) => r.cpu1m).filter((x) => !Number.isNaN(x))),
      rs,
    };
  });
  const none = rows[0]!;
  const each = (xs: number[], digits: (x: number) => string): string =>
    ROUNDS > 1 ? ` (${xs.map(digits).join(' / ')})` : '';
  const iopsText = (x: number): string => Math.round(x).toLocaleString('en');
  const mbpsText = (x: number): string => x.toFixed(0);
  return [
    '## Throughput: no replica, one async, one sync (loopback)',
    '',
    `fio nbd engine, one connection, ${RUNTIME} s after ${RAMP} s ramp, 1 GiB working set on a 2 GiB dedup volume, fresh half-compressible data.` +
      (ROUNDS > 1
        ? ` ${ROUNDS} rounds of the three, alternating: medians, each round's figure in brackets; ratios of medians.`
        : ''),
    '',
    '| replica | 4k randwrite QD32 (IOPS) | ratio | 1M seq write QD8 (MB/s) | ratio |',
    '| --- | ---: | ---: | ---: | ---: |',
    ...rows.map(
      (r) =>
        `| ${r.config} | ${iopsText(r.iops)}${each(
          r.rs.map((x) => x.iops),
          iopsText,
        )} | ${(r.iops / none.iops).toFixed(2)}× | ${mbpsText(r.mbps)}${each(
          r.rs.map((x) => x.mbps),
          mbpsText,
        )} | ${(r.mbps / none.mbps).toFixed(2)}× |`,
    ),
    '',
    "Both gateways' CPU time (all threads, user and system, from /proc) over each fio run, per 4 KiB",
    'write and per MB of 1 MiB writes: steadier than throughput on a shared machine.',
    '',
    '| replica | CPU per 4k write | CPU per MB |',
    '| --- | ---: | ---: |',
    ...rows.map((r) => `| ${r.config} | ${formatCpu(r.cpu4k, 'op')} | ${formatCpu(r.cpu1m, 'MB')} |`),
    '',
    `Targets (issue 4): sync ≥ 0.5× no-replica 4k IOPS: ${rows[2]!.iops / none.iops >= 0.5 ? 'PASS' : 'FAIL'}; sync ≥ 0.6× its 1M throughput: ${rows[2]!.mbps / none.mbps >= 0.6 ? 'PASS' : 'FAIL'}.`,
    '',
  ];
}

async function wire(tmp: string): Promise<string[]> {
  const work = path.join(tmp, 'wire');
  fs.mkdirSync(work, { recursive: true });
  const { base } = buildCorpusImage(work);
  const pair = await startPair(path.join(work, 'pair'));
  try {
    const ideal = new IdealBytes();
    const names = Array.from({ length: VOLUMES }, (_, v) => `vm${v}`);
    for (const n of names) {
      pair.primary.cli('volume', 'create', n, '--size', `${IMAGE / MiB}M`);
      pair.primary.cli('replica', 'add', n, '--to', pair.to, '--mode', 'async');
    }
    let before = 0;
    for (const n of names) before += (await inSync(pair.primary, n))[0]!.sentBytes;
    const started = Date.now();
    for (let v = 0; v < VOLUMES; v++) {
      const final = changedVolume(base, v);
      const file = path.join(work, `${names[v]}.raw`);
      fs.writeFileSync(file, final);
      sh('nbdcopy', [file, pair.primary.uri(names[v]!)], 600_000);
      fs.rmSync(file);
      ideal.add(final);
    }
    let after = 0;
    for (const n of names) after += (await inSync(pair.primary, n))[0]!.sentBytes;
    const seconds = (Date.now() - started) / 1000;
    const sent = after - before;
    const logical = VOLUMES * IMAGE;
    const compare = spawnSync(
      'qemu-img',
      ['compare', '-f', 'raw', '-F', 'raw', pair.primary.uri('vm9'), pair.replica.uri('vm9')],
      { encoding: 'utf8' },
    );
    return [
      '## Wire bytes: ten volumes from one image, ~2% changed in each',
      '',
      '| figure | value |',
      '| --- | ---: |',
      `| logical bytes written | ${(logical / MiB).toFixed(0)} MiB |`,
      `| ideal: unique non-zero blocks after lz4 | ${(ideal.bytes / MiB).toFixed(1)} MiB (${ideal.blocks} blocks) |`,
      `| bytes sent on the links (frames, ids and blocks) | ${(sent / MiB).toFixed(1)} MiB |`,
      `| sent / logical | ${(sent / logical).toFixed(3)} |`,
      `| sent / ideal | ${(sent / ideal.bytes).toFixed(3)} (target ≤ 1.15: ${sent / ideal.bytes <= 1.15 ? 'PASS' : 'FAIL'}) |`,
      `| time to write and mirror the ${VOLUMES} volumes | ${seconds.toFixed(1)} s |`,
      `| qemu-img compare vm9, primary against replica | ${compare.status === 0 ? 'identical' : `differs (${compare.stdout.trim()})`} |`,
      '',
    ];
  } finally {
    await stopPair(pair);
  }
}

async function resync(tmp: string, size: number): Promise<string> {
  const pair = await startPair(path.join(tmp, `resync-${size}`));
  try {
    const blocks = size / 4096;
    pair.primary.cli('volume', 'create', 'r', '--size', `${size / MiB}M`);
    fio(pair.primary.uri('r'), 'write', '1M', 8, [`--size=${size}`]);
    pair.primary.cli('replica', 'add', 'r', '--to', pair.to, '--mode', 'async');
    await inSync(pair.primary, 'r');
    const before = mirrors(pair.primary, 'r')[0]!.sentBytes;
    const port = pair.replica.replicationPort;
    await pair.replica.stop('SIGKILL');
    const changes = Math.round(blocks * 0.05);
    const stored = (): number =>
      (JSON.parse(pair.primary.cli('stats', '--json')) as { dedup: { segmentBytes: number } }).dedup
        .segmentBytes;
    const storedBefore = stored();
    fio(pair.primary.uri('r'), 'randwrite', '4k', 32, [
      `--size=${size}`,
      `--number_ios=${changes}`,
      '--end_fsync=1',
    ]);
    // What the changes appended to the primary's segments: the changed unique data after lz4.
    const changedStored = stored() - storedBefore;
    const replica = new Gw(pair.replica.dir, [
      '--cluster-key',
      pair.keyFile,
      '--replication-listen',
      `127.0.0.1:${port}`,
    ]);
    pair.replica = replica;
    await replica.ready();
    const t0 = Date.now();
    await inSync(pair.primary, 'r');
    const seconds = (Date.now() - t0) / 1000;
    const after = mirrors(pair.primary, 'r')[0]!;
    const sent = after.sentBytes - before;
    const changed = changes * 4096;
    return `| ${size / GiB} GiB | ${changes} writes, ${(changed / MiB).toFixed(1)} MiB | ${(changedStored / MiB).toFixed(1)} MiB | ${(sent / MiB).toFixed(1)} MiB | ${(sent / changedStored).toFixed(2)}× | ${(sent / changed).toFixed(2)}× | ${seconds.toFixed(1)} s |`;
  } finally {
    await stopPair(pair);
  }
}

async function main(): Promise<void> {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-bench-mirror-'));
  try {
    const lines = [
      '# blockgate mirroring benchmark',
      '',
      `- date: ${new Date().toISOString()}${quick ? ' (quick)' : ''}`,
      `- machine: ${os.availableParallelism()} CPUs, ${(os.totalmem() / GiB).toFixed(1)} GiB RAM; both gateways and fio on it, links on loopback`,
      '',
      ...(await throughput(tmp)),
      ...(quick ? [] : await wire(tmp)),
      '## Resync after a replica was down while 5% of the volume changed',
      '',
      'Random 4 KiB writes of fresh half-compressible data while the replica is killed; then it restarts and catches up (its dirty chunks, hash-first).',
      '',
      '| volume | changed (logical) | changed unique, stored after lz4 | resync bytes sent | sent / changed stored | sent / changed logical | resync time |',
      '| --- | ---: | ---: | ---: | ---: | ---: | ---: |',
      await resync(tmp, GiB),
      ...(quick ? [] : [await resync(tmp, 4 * GiB)]),
      '',
      "Target (issue 4): resync bytes ≤ 1.2× the changed unique data (the stored column: what the changes added to the primary's store, after lz4, with 40-byte record headers). The resync also sends a 17-byte id for every block of each dirty 4 MiB chunk; random writes dirty them all.",
      '',
    ];
    const text = lines.join('\n');
    process.stdout.write(text);
    fs.mkdirSync(RESULTS, { recursive: true });
    fs.writeFileSync(path.join(RESULTS, quick ? 'mirror-quick.md' : 'mirror-latest.md'), text);
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench mirror: ${(err as Error).message}\n`);
  process.exit(1);
});
