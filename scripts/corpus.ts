// The dedup corpus shared by `scripts/bench corpus` and `scripts/bench mirror`:
// a 256 MiB ext4 image full of real files (copied from /usr/share and
// /usr/lib), and ten volumes made from it, each with about 2% of its blocks
// changed in a way of its own. Also the ideal those volumes should cost: the
// unique non-zero 4 KiB blocks, each after lz4 (raw where lz4 gains nothing),
// computed from the contents independently of the store.

import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { native } from '../native-bindings';

const MiB = 1 << 20;
export const IMAGE = 256 * MiB;
const FILES = 200 * MiB;
export const VOLUMES = 10;
export const CHANGED = 0.02;
const BLOCK = 4096;

export function sh(cmd: string, args: string[], timeoutMs = 300_000): string {
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

/** The base image, built under `work`; `copied` is how much file data it holds. */
export function buildCorpusImage(work: string): { base: Buffer; copied: number } {
  const staging = path.join(work, 'files');
  const copied = gatherFiles(['/usr/share', '/usr/lib'], staging, FILES);
  const image = path.join(work, 'image.ext4');
  sh('/usr/sbin/mkfs.ext4', ['-q', '-F', '-d', staging, image, `${IMAGE / MiB}M`]);
  fs.rmSync(staging, { recursive: true, force: true });
  const base = fs.readFileSync(image);
  fs.rmSync(image);
  return { base, copied };
}

/** Volume `v`'s contents: the base with CHANGED of its blocks overwritten by edits of its own. */
export function changedVolume(base: Buffer, v: number): Buffer {
  const blocks = base.length / BLOCK;
  const final = Buffer.from(base);
  let seed = crypto.createHash('sha256').update(`changes ${v}`).digest().readUInt32BE(0);
  const next = (): number => (seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0);
  for (let i = 0; i < blocks * CHANGED; i++) {
    const lba = next() % blocks;
    // Text that compresses, as edited files do.
    final.write(`vm${v} change ${i} `.repeat(300).slice(0, BLOCK), lba * BLOCK, 'latin1');
  }
  return final;
}

/** Accumulates the ideal: each distinct non-zero block once, at its lz4 size. */
export class IdealBytes {
  private readonly unique = new Map<string, number>();
  private readonly scratch = Buffer.alloc(BLOCK);

  add(contents: Buffer): void {
    for (let at = 0; at < contents.length; at += BLOCK) {
      const block = contents.subarray(at, at + BLOCK);
      if (block.every((b) => b === 0)) continue;
      const key = crypto.createHash('sha256').update(block).digest('base64');
      if (this.unique.has(key)) continue;
      const n = native.lz4Compress(block, this.scratch.subarray(0, BLOCK - 1));
      this.unique.set(key, n > 0 ? n : BLOCK);
    }
  }

  get blocks(): number {
    return this.unique.size;
  }

  get bytes(): number {
    let sum = 0;
    for (const n of this.unique.values()) sum += n;
    return sum;
  }
}
