// `scripts/bench rss [--size SIZE]`: the gateway's memory while a dedup volume
// takes SIZE (default 10G) of fresh, half-compressible data from fio (1 MiB
// sequential writes, depth 8). Samples /proc/PID/status every 250 ms and
// reports the peak of VmRSS and of its two parts: anonymous memory (heaps,
// overlays, buffers) and file pages (the index's memory map, which the kernel
// can drop and reread). Writes bench/results/rss-latest.md.
//
// A measurement, not a test: exits 0 whatever the figures, 1 if a run failed.

import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { formatSize, parseSize } from '../gateway/util/size';

const MiB = 1 << 20;
const ROOT = path.resolve(__dirname, '..', '..');
const BIN = path.join(ROOT, 'bin', 'blockgate');
const RESULTS = path.join(ROOT, 'bench', 'results');
const SAMPLE_MS = 250;
const LIMIT = 512 * MiB;

interface Peak {
  rss: number;
  anon: number;
  file: number;
}

function sample(pid: number, peak: Peak): void {
  let status: string;
  try {
    status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  } catch {
    return; // exited
  }
  const kb = (field: string): number =>
    Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? 0) * 1024;
  peak.rss = Math.max(peak.rss, kb('VmRSS'));
  peak.anon = Math.max(peak.anon, kb('RssAnon'));
  peak.file = Math.max(peak.file, kb('RssFile'));
}

function cli(dataDir: string, args: string[]): string {
  const r = spawnSync(process.execPath, [BIN, '--data', dataDir, ...args], {
    encoding: 'utf8',
    timeout: 120_000,
  });
  if (r.status !== 0) throw new Error(`blockgate ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

async function main(): Promise<void> {
  const at = process.argv.indexOf('--size');
  const size = parseSize(at >= 0 ? (process.argv[at + 1] ?? '') : '10G');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-bench-rss-'));
  const dataDir = path.join(dir, 'data');
  const socket = path.join(dir, 'nbd.sock');
  const gw = spawn(process.execPath, [BIN, 'serve', '--data', dataDir, '--listen', `unix:${socket}`], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  gw.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
  const peak: Peak = { rss: 0, anon: 0, file: 0 };
  const timer = setInterval(() => sample(gw.pid!, peak), SAMPLE_MS);
  try {
    for (let i = 0; !stderr.includes(' ready: '); i++) {
      if (i > 200 || gw.exitCode !== null) throw new Error(`gateway did not start:\n${stderr}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    cli(dataDir, ['volume', 'create', 'rss', '--size', `${(size + 1024 * MiB) / MiB}M`]);
    const started = Date.now();
    const fio = spawnSync(
      'fio',
      [
        '--name=rss',
        '--ioengine=nbd',
        `--uri=nbd+unix:///rss?socket=${socket}`,
        '--rw=write',
        '--bs=1M',
        '--iodepth=8',
        `--size=${size}`,
        '--refill_buffers',
        '--buffer_compress_percentage=50',
        '--randrepeat=0',
        '--end_fsync=1',
      ],
      { encoding: 'utf8', timeout: 3_600_000 },
    );
    if (fio.status !== 0) throw new Error(`fio failed: ${fio.stderr}`);
    const seconds = (Date.now() - started) / 1000;
    sample(gw.pid!, peak);
    const stats = JSON.parse(cli(dataDir, ['stats', '--json'])) as {
      dedup?: { logicalBytes: number; storedBytes: number; indexBytes: number; indexBytesPerBlock: number };
    };
    const d = stats.dedup;
    const lines = [
      '# blockgate gateway memory under a large dedup write',
      '',
      `- date: ${new Date().toISOString()}`,
      `- machine: ${os.availableParallelism()} CPUs, ${formatSize(os.totalmem())} RAM`,
      `- load: fio nbd engine, ${formatSize(size)} written sequentially in 1 MiB requests at depth 8, fresh half-compressible data, ${seconds.toFixed(0)} s (${(size / seconds / 1e6).toFixed(0)} MB/s)`,
      '',
      '| figure | value |',
      '| --- | ---: |',
      `| peak RSS | ${formatSize(peak.rss)} |`,
      `| peak anonymous (heaps, overlays, buffers) | ${formatSize(peak.anon)} |`,
      `| peak file pages (index memory map, reclaimable) | ${formatSize(peak.file)} |`,
      `| logical bytes | ${d ? formatSize(d.logicalBytes) : '—'} |`,
      `| stored bytes | ${d ? formatSize(d.storedBytes) : '—'} |`,
      `| index bytes (used pages) | ${d ? formatSize(d.indexBytes) : '—'} |`,
      `| index bytes per stored block | ${d ? d.indexBytesPerBlock : '—'} |`,
      '',
      `Target (issue 3): RSS ≤ ${formatSize(LIMIT)} with 10 GiB written: ${peak.rss <= LIMIT ? 'PASS' : 'FAIL'}.`,
      '',
    ];
    process.stdout.write(lines.join('\n'));
    fs.mkdirSync(RESULTS, { recursive: true });
    fs.writeFileSync(path.join(RESULTS, 'rss-latest.md'), lines.join('\n'));
  } finally {
    clearInterval(timer);
    if (gw.exitCode === null) gw.kill('SIGTERM');
    if (gw.exitCode === null)
      await new Promise((r) => {
        const t = setTimeout(() => gw.kill('SIGKILL'), 60_000);
        gw.once('exit', () => r(clearTimeout(t)));
      });
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench rss: ${(err as Error).message}\n`);
  process.exit(1);
});
