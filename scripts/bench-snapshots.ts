// `scripts/bench snapshots [--quick]`: what snapshots and clones cost (issue 5):
//
//   clone time   a dedup volume filled with fresh data (fio, 1M sequential),
//                then `snapshot create` and `clone` timed, for growing sizes:
//                the cost must stay flat, not grow with the data;
//   barrier      fio 4k randwrite QD32 on a volume while a snapshot is taken
//                every second: how long writes were held (the gateway's own
//                figure) and fio's completion latency against a run without
//                snapshots;
//   materialize  a volume written in random order (records scattered), read
//                sequentially from a cold start (gateway restarted, page cache
//                dropped), then materialized and read cold again;
//   seeded       a volume exported to a seed bundle, 5% of it changed, the
//                bundle imported on a second gateway and `replica add
//                --seeded`: bytes on the link against the volume and the
//                changes, beside a replica added without a seed.
//
// A measurement, not a test: exits 0 whatever the figures, 1 if a run failed.
// Writes bench/results/snapshots-latest.md.

import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fio, Gw, inSync, sleep, startPair, stopPair } from './bench-gateway';

const MiB = 1 << 20;
const GiB = 1 << 30;
const ROOT = path.resolve(__dirname, '..', '..');
const RESULTS = path.join(ROOT, 'bench', 'results');

const quick = process.argv.includes('--quick');

function freeBytes(dir: string): number {
  const s = fs.statfsSync(dir);
  return s.bavail * s.bsize;
}

async function cloneTimes(tmp: string): Promise<string[]> {
  const wanted = quick ? [64 * MiB, 256 * MiB] : [GiB, 4 * GiB, 10 * GiB];
  // Room for the data (incompressible half, so ~0.6x) and its index, twice over.
  const sizes = wanted.filter((s) => s * 1.5 < freeBytes(tmp));
  const gw = new Gw(path.join(tmp, 'clone'), []);
  fs.mkdirSync(gw.dir, { recursive: true });
  const rows: string[] = [];
  try {
    await gw.ready();
    for (const size of sizes) {
      const name = `v${size / MiB}m`;
      gw.cli('volume', 'create', name, '--size', String(size));
      const fill = fio(gw.uri(name), 'write', '1M', 8, [`--size=${size}`]);
      gw.cli('stats');
      let t = process.hrtime.bigint();
      const snap = JSON.parse(gw.cli('snapshot', 'create', name, 'base', '--json')) as { barrierMs: number };
      const snapMs = Number(process.hrtime.bigint() - t) / 1e6;
      t = process.hrtime.bigint();
      const clone = JSON.parse(gw.cli('clone', `${name}@base`, `${name}-c`, '--json')) as { ms: number };
      const cloneMs = Number(process.hrtime.bigint() - t) / 1e6;
      t = process.hrtime.bigint();
      const clone2 = JSON.parse(gw.cli('clone', name, `${name}-c2`, '--json')) as { ms: number };
      const clone2Ms = Number(process.hrtime.bigint() - t) / 1e6;
      rows.push(
        `| ${size / MiB} MiB | ${fill.mbps.toFixed(0)} MB/s | ${snap.barrierMs.toFixed(2)} ms | ${snapMs.toFixed(0)} ms | ` +
          `${clone.ms.toFixed(1)} ms / ${cloneMs.toFixed(0)} ms | ${clone2.ms.toFixed(1)} ms / ${clone2Ms.toFixed(0)} ms |`,
      );
      process.stderr.write(`${rows[rows.length - 1]}\n`);
    }
  } finally {
    await gw.stop();
  }
  return [
    '## Clone and snapshot time against volume size',
    '',
    'A dedup volume filled with fresh half-compressible data by fio (1M sequential), then timed from the CLI. ' +
      '"gateway" is the server-side time the command reports, "CLI" includes starting the CLI process (~100 ms of node start-up).',
    '',
    '| volume (full) | fill rate | snapshot: writes held | snapshot: CLI | clone VOL@SNAP: gateway / CLI | clone VOL (takes a snapshot): gateway / CLI |',
    '|---|---|---|---|---|---|',
    ...rows,
    '',
  ];
}

interface Latency {
  iops: number;
  p99us: number;
  maxUs: number;
}

function fioLatency(uri: string, seconds: number): Promise<Latency> {
  return new Promise((resolve, reject) => {
    const args = [
      '--name=b',
      '--ioengine=nbd',
      `--uri=${uri}`,
      '--rw=randwrite',
      '--bs=4k',
      '--iodepth=32',
      '--size=1G',
      '--refill_buffers',
      '--buffer_compress_percentage=50',
      '--randrepeat=0',
      '--norandommap',
      '--time_based',
      `--runtime=${seconds}`,
      '--output-format=json',
    ];
    const p = spawn('fio', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    p.stdout.on('data', (c: Buffer) => (out += c.toString()));
    const timer = setTimeout(() => p.kill('SIGKILL'), (seconds + 120) * 1000);
    p.on('close', (code) => {
      clearTimeout(timer);
      if (code !== 0) return reject(new Error(`fio exited ${code}`));
      const w = (
        JSON.parse(out.slice(out.indexOf('{'))) as {
          jobs: Array<{
            write: { iops: number; clat_ns: { max: number; percentile: Record<string, number> } };
          }>;
        }
      ).jobs[0]!.write;
      resolve({
        iops: w.iops,
        p99us: w.clat_ns.percentile['99.000000']! / 1000,
        maxUs: w.clat_ns.max / 1000,
      });
    });
  });
}

async function barrier(tmp: string): Promise<string[]> {
  const seconds = quick ? 5 : 20;
  const gw = new Gw(path.join(tmp, 'barrier'), []);
  fs.mkdirSync(gw.dir, { recursive: true });
  try {
    await gw.ready();
    gw.cli('volume', 'create', 'b', '--size', '2G');
    fio(gw.uri('b'), 'write', '1M', 8, []);
    const plain = await fioLatency(gw.uri('b'), seconds);
    const loaded = fioLatency(gw.uri('b'), seconds);
    const held: number[] = [];
    await sleep(1000);
    for (let i = 0; i < seconds - 2; i++) {
      const r = JSON.parse(gw.cli('snapshot', 'create', 'b', `s${i}`, '--json')) as { barrierMs: number };
      held.push(r.barrierMs);
      await sleep(1000);
    }
    const withSnaps = await loaded;
    held.sort((a, b) => a - b);
    const median = held[Math.floor(held.length / 2)]!;
    return [
      '## Snapshot barrier under load',
      '',
      `fio 4k randwrite QD32 for ${seconds} s on a 2 GiB dedup volume; in the second run a snapshot every second (${held.length} in all).`,
      '',
      `- writes held per snapshot: median ${median.toFixed(2)} ms, max ${held[held.length - 1]!.toFixed(2)} ms`,
      '',
      '| run | IOPS | p99 completion | max completion |',
      '|---|---|---|---|',
      `| no snapshots | ${plain.iops.toFixed(0)} | ${(plain.p99us / 1000).toFixed(2)} ms | ${(plain.maxUs / 1000).toFixed(2)} ms |`,
      `| a snapshot per second | ${withSnaps.iops.toFixed(0)} | ${(withSnaps.p99us / 1000).toFixed(2)} ms | ${(withSnaps.maxUs / 1000).toFixed(2)} ms |`,
      '',
    ];
  } finally {
    await gw.stop();
  }
}

/** Drops the page cache (root only); false when it could not, and the reads are warm. */
function dropCaches(): boolean {
  try {
    spawnSync('sync');
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
    return true;
  } catch {
    return false;
  }
}

async function coldRead(dir: string): Promise<{ mbps: number; cold: boolean; gw: Gw }> {
  const gw = new Gw(dir, []);
  await gw.ready();
  const cold = dropCaches();
  const r = fio(gw.uri('frag'), 'read', '1M', 8, []);
  return { mbps: r.mbps, cold, gw };
}

async function materialize(tmp: string): Promise<string[]> {
  const size = quick ? 256 * MiB : GiB;
  const dir = path.join(tmp, 'materialize');
  fs.mkdirSync(dir, { recursive: true });
  let gw = new Gw(dir, []);
  try {
    await gw.ready();
    gw.cli('volume', 'create', 'frag', '--size', String(size));
    fio(gw.uri('frag'), 'randwrite', '4k', 32, [`--size=${size}`]);
    const fragBefore = volumeFragmentation(gw);
    await gw.stop();
    const before = await coldRead(dir);
    gw = before.gw;
    const t = process.hrtime.bigint();
    const m = JSON.parse(gw.cli('materialize', 'frag', '--json')) as { after: number; movedBytes: number };
    const ms = Number(process.hrtime.bigint() - t) / 1e6;
    await gw.stop();
    const after = await coldRead(dir);
    gw = after.gw;
    return [
      '## Cold sequential read before and after materialize',
      '',
      `A ${size / MiB} MiB dedup volume written once by fio 4k randwrite (every block, random order, fresh data), ` +
        `then read by fio 1M sequential QD8 right after a gateway restart${before.cold ? ' with the page cache dropped' : ' (page cache NOT dropped: not root)'}.`,
      '',
      '| | reads per MiB (volume info) | cold sequential read |',
      '|---|---|---|',
      `| written in random order | ${fragBefore.toFixed(1)} | ${before.mbps.toFixed(0)} MB/s |`,
      `| after materialize (${(ms / 1000).toFixed(1)} s, ${(m.movedBytes / MiB).toFixed(0)} MiB rewritten) | ${m.after.toFixed(1)} | ${after.mbps.toFixed(0)} MB/s |`,
      '',
    ];
  } finally {
    await gw.stop();
  }
}

function volumeFragmentation(gw: Gw): number {
  return (JSON.parse(gw.cli('volume', 'info', 'frag', '--json')) as { dedup: { fragmentation: number } })
    .dedup.fragmentation;
}

async function seeded(tmp: string): Promise<string[]> {
  const size = quick ? 256 * MiB : GiB;
  const pair = await startPair(path.join(tmp, 'seeded'));
  try {
    const { primary, replica, to } = pair;
    for (const v of ['s', 'u']) {
      primary.cli('volume', 'create', v, '--size', String(size));
      fio(primary.uri(v), 'write', '1M', 8, [`--size=${size}`]);
    }
    const bundle = path.join(tmp, 'seeded', 's.seed');
    const exported = JSON.parse(primary.cli('seed', 'export', 's', '--to', bundle, '--json')) as {
      streamBytes: number;
    };
    // 5% of the blocks change after the export point (random 4k writes of fresh data).
    const changes = ['--size=' + String(size), `--io_size=${Math.round(size * 0.05)}`, '--norandommap=0'];
    fio(primary.uri('s'), 'randwrite', '4k', 32, changes);
    fio(primary.uri('u'), 'randwrite', '4k', 32, changes);
    let t = Date.now();
    replica.cli('seed', 'import', bundle, '--as', 's');
    const importMs = Date.now() - t;
    t = Date.now();
    primary.cli('replica', 'add', 's', '--to', to, '--seeded');
    const s = (await inSync(primary, 's'))[0]!;
    const seededMs = Date.now() - t;
    t = Date.now();
    primary.cli('replica', 'add', 'u', '--to', to);
    const u = (await inSync(primary, 'u'))[0]!;
    const plainMs = Date.now() - t;
    const changed = size * 0.05;
    return [
      '## Seeded replica: bytes on the link',
      '',
      `Two ${size / MiB} MiB dedup volumes filled with fresh half-compressible data, 5% of each then changed (4k random writes of fresh data). ` +
        `One was exported to a seed bundle before the changes (${(exported.streamBytes / MiB).toFixed(0)} MiB on disk, imported on the replica gateway in ${(importMs / 1000).toFixed(1)} s) and added with \`--seeded\`; the other was added without a seed.`,
      '',
      '| replica | link bytes | / volume size | / changed data | time to in-sync |',
      '|---|---|---|---|---|',
      `| seeded | ${(s.sentBytes / MiB).toFixed(1)} MiB | ${(s.sentBytes / size).toFixed(3)} | ${(s.sentBytes / changed).toFixed(2)} | ${(seededMs / 1000).toFixed(1)} s |`,
      `| no seed | ${(u.sentBytes / MiB).toFixed(1)} MiB | ${(u.sentBytes / size).toFixed(3)} | ${(u.sentBytes / changed).toFixed(2)} | ${(plainMs / 1000).toFixed(1)} s |`,
      '',
    ];
  } finally {
    await stopPair(pair);
  }
}

async function main(): Promise<void> {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-bench-snap-'));
  const started = new Date();
  try {
    const lines = [
      `# blockgate snapshots and clones — ${started.toISOString()}${quick ? ' (quick)' : ''}`,
      '',
      `- machine: ${os.availableParallelism()} CPUs, ${(os.totalmem() / GiB).toFixed(1)} GiB RAM; gateway and fio on it`,
      '',
      ...(await cloneTimes(tmp)),
      ...(await barrier(tmp)),
      ...(await materialize(tmp)),
      ...(await seeded(tmp)),
    ];
    const text = lines.join('\n');
    process.stdout.write(text + '\n');
    if (!quick) {
      fs.mkdirSync(RESULTS, { recursive: true });
      fs.writeFileSync(path.join(RESULTS, 'snapshots-latest.md'), text + '\n');
    }
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench snapshots: ${(err as Error).stack ?? String(err)}\n`);
  process.exit(1);
});
