// Shared pieces of the real-client tests: sparse images with random data
// regions, random files, hashes, scratch directories, volume creation, and
// what the gateway's debug log says about connections.

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Gateway } from './gateway';

export const KiB = 1024;
export const MiB = 1024 * KiB;

export interface Extent {
  offset: number;
  length: number;
}

/** A fresh temporary directory; remove it with fs.rmSync(dir, { recursive: true, force: true }). */
export function scratchDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `blockgate-${prefix}-`));
}

/**
 * Writes a sparse raw image of `size` bytes: in every 1 MiB slot, either a
 * hole or one region of random bytes at a random (mostly unaligned) offset
 * and length. Returns the regions written, in order. The last slot always
 * holds data that ends exactly at the end of the image.
 */
export function writeSparseImage(file: string, size: number): Extent[] {
  assert.ok(size % MiB === 0 && size >= 4 * MiB, 'image size must be a multiple of 1 MiB, at least 4 MiB');
  const regions: Extent[] = [];
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, size);
    const slots = size / MiB;
    for (let slot = 0; slot < slots; slot++) {
      const last = slot === slots - 1;
      if (!last && crypto.randomInt(3) === 0) continue; // a hole, about a third of the slots
      const start = slot * MiB + crypto.randomInt(MiB / 2);
      const length = last ? (slot + 1) * MiB - start : 1 + crypto.randomInt(MiB / 2 - 1);
      fs.writeSync(fd, crypto.randomBytes(length), 0, length, start);
      regions.push({ offset: start, length });
    }
  } finally {
    fs.closeSync(fd);
  }
  return regions;
}

/** Writes `length` random bytes to `file`. */
export function writeRandomFile(file: string, length: number): void {
  fs.writeFileSync(file, crypto.randomBytes(length));
}

export function sha256File(file: string): string {
  return crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

/** Creates a volume on a running gateway, failing the test with the CLI's output if it cannot. */
export async function createVolume(
  gw: Gateway,
  name: string,
  size: string,
  ...flags: string[]
): Promise<void> {
  const r = await gw.cli('volume', 'create', name, '--size', size, ...flags);
  assert.equal(r.code, 0, `volume create ${name} failed:\n${r.stderr}`);
}

/**
 * Checks that the data extents of a map (the ones not flagged as zero) cover
 * every written region and lie within the written regions widened to
 * `grain`-aligned boundaries: data where written, holes or zeroes elsewhere.
 */
export function assertDataMatchesWrites(dataExtents: Extent[], written: Extent[], grain: number): void {
  const covered = (x: Extent, set: Extent[]): boolean => {
    // Is [x.offset, x.offset+x.length) inside the union of `set` (sorted, possibly adjacent)?
    let pos = x.offset;
    const end = x.offset + x.length;
    for (const e of set) {
      if (e.offset > pos) break;
      if (e.offset + e.length > pos) pos = e.offset + e.length;
      if (pos >= end) return true;
    }
    return pos >= end;
  };
  const sorted = (s: Extent[]): Extent[] => [...s].sort((a, b) => a.offset - b.offset);
  const data = sorted(dataExtents);
  const widened = sorted(written).map((w) => {
    const start = Math.floor(w.offset / grain) * grain;
    const end = Math.ceil((w.offset + w.length) / grain) * grain;
    return { offset: start, length: end - start };
  });
  for (const w of written) {
    assert.ok(covered(w, data), `written region ${JSON.stringify(w)} is not reported as data`);
  }
  for (const d of data) {
    assert.ok(covered(d, widened), `data extent ${JSON.stringify(d)} lies outside every written region`);
  }
}

/**
 * The most connections serving export `name` at once, from the log of a
 * gateway started with BLOCKGATE_LOG=debug.
 */
export function peakConnections(log: string, name: string): number {
  const open = new Set<string>();
  let peak = 0;
  for (const line of log.split('\n')) {
    const m = /nbd\/(conn\d+): (serving export (\S+)|closed)$/.exec(line);
    if (!m) continue;
    if (m[3] === name) open.add(m[1]!);
    else if (m[2] === 'closed') open.delete(m[1]!);
    peak = Math.max(peak, open.size);
  }
  return peak;
}
