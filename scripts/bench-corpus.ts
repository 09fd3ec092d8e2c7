// `scripts/bench corpus`: how well the dedup store deduplicates real data.
// A 256 MiB ext4 image full of real files (copied from /usr/share and
// /usr/lib) is written into 10 dedup volumes, then about 2% of each volume
// is overwritten with changes of its own. Stored bytes are compared with the
// logical bytes and with the ideal: the unique non-zero 4 KiB blocks of the
// ten final volumes, each after lz4 (or raw where lz4 gains nothing) —
// computed here from the contents, independently of the store.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { buildCorpusImage, CHANGED, changedVolume, IdealBytes, IMAGE, sh, VOLUMES } from './corpus';

const MiB = 1 << 20;
const ROOT = path.resolve(__dirname, '..', '..');
const BIN = path.join(ROOT, 'bin', 'blockgate');

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
    const { base, copied } = buildCorpusImage(work);
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

    const ideal = new IdealBytes();
    let written = 0;
    const started = Date.now();
    for (let v = 0; v < VOLUMES; v++) {
      const name = `vm${v}`;
      cli('volume', 'create', name, '--size', `${IMAGE / MiB}M`);
      const final = changedVolume(base, v);
      const file = path.join(work, `${name}.raw`);
      fs.writeFileSync(file, final);
      sh('nbdcopy', [file, `nbd+unix:///${name}?socket=${socket}`]);
      fs.rmSync(file);
      written += IMAGE;
      ideal.add(final);
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
      `| ideal: unique non-zero blocks after lz4 | ${(ideal.bytes / MiB).toFixed(1)} MiB (${ideal.blocks} blocks) |`,
      `| stored (segments' live records, with 40-byte headers) | ${(stored / MiB).toFixed(1)} MiB (${stats.dedup.uniqueBlocks} blocks) |`,
      `| stored / logical | ${(stored / written).toFixed(3)} |`,
      `| stored / ideal | ${(stored / ideal.bytes).toFixed(3)} (target ≤ 1.1) |`,
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
