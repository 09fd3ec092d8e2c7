// `scripts/bench corpus`: how well the dedup store deduplicates real data.
// A 256 MiB ext4 image full of real files (copied from /usr/share and
// /usr/lib) is written into 10 dedup volumes, then about 2% of each volume
// is overwritten with changes of its own. Stored bytes are compared with the
// logical bytes and with the ideal: the unique non-zero 4 KiB blocks of the
// ten final volumes, each after lz4 (or raw where lz4 gains nothing) —
// computed here from the contents, independently of the store.

import { spawn, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { native } from '../native-bindings';

const MiB = 1 << 20;
const IMAGE = 256 * MiB;
const FILES = 200 * MiB;
const VOLUMES = 10;
const CHANGED = 0.02;
const BLOCK = 4096;
const ROOT = path.resolve(__dirname, '..', '..');
const BIN = path.join(ROOT, 'bin', 'blockgate');

function sh(cmd: string, args: string[], timeoutMs = 300_000): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: timeoutMs, maxBuffer: 64 * MiB });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr || r.error}`);
  return r.stdout;
}

/** Copies regular files from the given trees into `dest` until `limit` bytes. */
function gatherFiles(sources: string[], dest: string, limit: number): number {
  let total = 0;
  const walk = (dir: string, rel: string): void => {
    let entries: fs.Dirent[];
    try {
      entries = fs.readdirSync(dir, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries) {
      if (total >= limit) return;
      const src = path.join(dir, e.name);
      const dst = path.join(dest, rel, e.name);
      if (e.isDirectory()) walk(src, path.join(rel, e.name));
      else if (e.isFile()) {
        try {
          const size = fs.statSync(src).size;
          if (size === 0 || total + size > limit) continue;
          fs.mkdirSync(path.dirname(dst), { recursive: true });
          fs.copyFileSync(src, dst);
          total += size;
        } catch {
          // unreadable: skip
        }
      }
    }
  };
  for (const s of sources) walk(s, path.basename(s));
  return total;
}

async function main(): Promise<void> {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-corpus-'));
  let gateway: ReturnType<typeof spawn> | null = null;
  const stop = (): void => {
    gateway?.kill('SIGTERM');
  };
  process.on('SIGINT', () => {
    stop();
    process.exit(130);
  });
  try {
    const staging = path.join(work, 'files');
    const copied = gatherFiles(['/usr/share', '/usr/lib'], staging, FILES);
    const image = path.join(work, 'image.ext4');
    sh('/usr/sbin/mkfs.ext4', ['-q', '-F', '-d', staging, image, `${IMAGE / MiB}M`]);
    fs.rmSync(staging, { recursive: true, force: true });
    const base = fs.readFileSync(image);
    process.stderr.write(
      `corpus: ${(copied / MiB).toFixed(0)} MiB of files in a ${IMAGE / MiB} MiB ext4 image\n`,
    );

    const data = path.join(work, 'data');
    const socket = path.join(work, 'nbd.sock');
    gateway = spawn(process.execPath, [BIN, 'serve', '--data', data, '--listen', `unix:${socket}`], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let log = '';
    gateway.stderr!.on('data', (c: Buffer) => (log += c.toString()));
    for (let i = 0; i < 200 && !/ ready: /.test(log); i++) await new Promise((r) => setTimeout(r, 50));
    if (!/ ready: /.test(log)) throw new Error(`gateway did not start:\n${log}`);
    const cli = (...args: string[]): string => sh(process.execPath, [BIN, '--data', data, ...args]);
    cli('volume', 'delete', 'disk0');

    // Final contents per volume, for the ideal: the base image plus that volume's changes.
    const blocks = IMAGE / BLOCK;
    const unique = new Map<string, number>(); // sha256 -> stored size after lz4
    const scratch = Buffer.alloc(BLOCK);
    const account = (block: Buffer): void => {
      if (block.every((b) => b === 0)) return;
      const key = crypto.createHash('sha256').update(block).digest('base64');
      if (unique.has(key)) return;
      const n = native.lz4Compress(block, scratch.subarray(0, BLOCK - 1));
      unique.set(key, n > 0 ? n : BLOCK);
    };
    let written = 0;
    const started = Date.now();
    for (let v = 0; v < VOLUMES; v++) {
      const name = `vm${v}`;
      cli('volume', 'create', name, '--size', `${IMAGE / MiB}M`);
      const final = Buffer.from(base);
      const rng = crypto.createHash('sha256').update(`changes ${v}`).digest();
      let seed = rng.readUInt32BE(0);
      const next = (): number => (seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0);
      for (let i = 0; i < blocks * CHANGED; i++) {
        const lba = next() % blocks;
        // A change of this volume's own: text that compresses, as edited files do.
        final.write(`vm${v} change ${i} `.repeat(300).slice(0, BLOCK), lba * BLOCK, 'latin1');
      }
      const file = path.join(work, `${name}.raw`);
      fs.writeFileSync(file, final);
      sh('nbdcopy', [file, `nbd+unix:///${name}?socket=${socket}`]);
      fs.rmSync(file);
      written += IMAGE;
      for (let b = 0; b < blocks; b++) account(final.subarray(b * BLOCK, (b + 1) * BLOCK));
    }
    const seconds = (Date.now() - started) / 1000;
    const stats = JSON.parse(cli('stats', '--json')) as {
      rssBytes: number;
      dedup: {
        storedBytes: number;
        uniqueBlocks: number;
        logicalBytes: number;
        mappedBlocks: number;
        indexBytes: number;
        indexBytesPerBlock: number;
      };
    };
    const ideal = [...unique.values()].reduce((a, b) => a + b, 0);
    const stored = stats.dedup.storedBytes;
    const lines = [
      `blockgate dedup corpus — ${new Date().toISOString()}`,
      '',
      `${VOLUMES} volumes × ${IMAGE / MiB} MiB ext4 image (${(copied / MiB).toFixed(0)} MiB of files from /usr/share, /usr/lib), ${CHANGED * 100}% of each changed differently`,
      '',
      '| figure | value |',
      '|---|---|',
      `| logical bytes written | ${(written / MiB).toFixed(0)} MiB |`,
      `| non-zero logical bytes (mapped) | ${(stats.dedup.logicalBytes / MiB).toFixed(0)} MiB |`,
      `| ideal: unique non-zero blocks after lz4 | ${(ideal / MiB).toFixed(1)} MiB (${unique.size} blocks) |`,
      `| stored (segments' live records, with 40-byte headers) | ${(stored / MiB).toFixed(1)} MiB (${stats.dedup.uniqueBlocks} blocks) |`,
      `| stored / logical | ${(stored / written).toFixed(3)} |`,
      `| stored / ideal | ${(stored / ideal).toFixed(3)} (target ≤ 1.1) |`,
      `| index bytes per stored block | ${stats.dedup.indexBytesPerBlock} (per mapped block: ${Math.round(stats.dedup.indexBytes / stats.dedup.mappedBlocks)}) |`,
      `| gateway RSS at the end | ${(stats.rssBytes / MiB).toFixed(0)} MiB |`,
      `| time to write the ${VOLUMES} volumes | ${seconds.toFixed(1)} s |`,
    ];
    const text = lines.join('\n') + '\n';
    process.stdout.write(text);
    fs.mkdirSync(path.join(ROOT, 'bench', 'results'), { recursive: true });
    fs.writeFileSync(path.join(ROOT, 'bench', 'results', 'corpus-latest.md'), text);
  } finally {
    stop();
    await new Promise((r) => setTimeout(r, 1000));
    fs.rmSync(work, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench corpus: ${(err as Error).message}\n`);
  process.exit(1);
});
