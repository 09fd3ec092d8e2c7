// The dedup store under injected faults: concurrent, overlapping writes, reads and
// compactions while some segment writes fail and some index commits are refused.
// A write that succeeded reads back as written; one that failed reads back as what
// was there before or what it wrote, never anything else (never a hole where data
// was); nothing rejects unobserved; and fsck finds the store consistent at the end.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { BlockError } from '../../gateway/device/errors';
import { Compactor } from '../../gateway/store/compactor';
import { DedupDevice } from '../../gateway/store/dedup-device';
import { DedupStore } from '../../gateway/store/dedup-store';
import { fsckStore } from '../../gateway/store/fsck';
import { silentLogger } from '../../gateway/util/log';

const BLOCKS = 1024;
const ROUNDS = 40;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-faults-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

function random(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Few distinct contents, so writes share blocks with each other and with blocks in flight. */
function content(k: number, variant: number): Buffer {
  const b = Buffer.alloc(4096, k);
  b.writeUInt32BE(variant, 4092);
  return b;
}

function label(b: Buffer): string {
  return b.every((x) => x === 0) ? 'zero' : `${b[0]}:${b.readUInt32BE(4092)}`;
}

/** The store's insides the faults are injected into. */
interface Insides {
  segments: { inflight: Set<Promise<void>>; currentSegment: number; roll(): void };
  writer: { commit(r: unknown): Promise<unknown> };
}

/**
 * Fails a share of segment writes after their bytes are down (as an fdatasync error
 * would) and a share of index commits. Returns a switch to stop both.
 */
function injectFaults(store: DedupStore, rnd: () => number): () => void {
  const s = store as unknown as Insides;
  const segments = s.segments;
  const append = store.segments.append.bind(store.segments);
  store.segments.append = (record: Buffer) => {
    const real = append(record);
    if (rnd() >= 0.08) return real;
    const written = real.written.then(() => {
      throw new BlockError('EIO', 'injected segment write failure');
    });
    segments.inflight.delete(real.written);
    segments.inflight.add(written);
    written.catch(() => {
      segments.inflight.delete(written);
      // As the real failure path does: nothing may follow the failed record.
      if (segments.currentSegment === real.segment) segments.roll();
    });
    return { ...real, written };
  };
  const commit = s.writer.commit.bind(s.writer);
  s.writer.commit = (r) => (rnd() < 0.2 ? Promise.reject(new Error('injected commit refusal')) : commit(r));
  return () => {
    store.segments.append = append;
    s.writer.commit = commit;
  };
}

async function run(seed: number, opts: { pool: boolean }): Promise<void> {
  const rnd = random(seed);
  const dir = path.join(tmp, `s${seed}-${opts.pool ? 'pool' : 'inline'}`);
  const store = DedupStore.open(dir, silentLogger, {
    checkpointEntries: 40,
    hashPoolMin: opts.pool ? 4096 : null,
    metaCacheBytes: 1 << 20,
  });
  const unhandled: unknown[] = [];
  const onUnhandled = (e: unknown): void => void unhandled.push(e);
  process.on('unhandledRejection', onUnhandled);
  const stopFaults = injectFaults(store, rnd);
  const compactor = new Compactor(store, silentLogger, {
    intervalMs: 0,
    threshold: 0.99,
    bytesPerSecond: 1e12,
  });
  const dev = new DedupDevice(store, store.volumeId('a'), BLOCKS * 4096);
  // What each block may read as: one label once settled, two after a failed write.
  const may: Array<Set<string>> = Array.from({ length: BLOCKS }, () => new Set(['zero']));
  const problems: string[] = [];
  try {
    for (let round = 0; round < ROUNDS; round++) {
      const ops: Promise<unknown>[] = [];
      const written = new Set<number>();
      for (let k = 0; k < 16; k++) {
        const lba = Math.floor(rnd() * (BLOCKS - 200));
        const count = 1 + Math.floor(rnd() * 180);
        if (rnd() < 0.35) {
          // A read racing the round's writes may see either side of any of them.
          const snapshot = Array.from({ length: count }, (_, i) => new Set(may[lba + i]));
          const into = Buffer.alloc(count * 4096);
          ops.push(
            dev.read(lba * 4096, into).then(
              () => {
                for (let i = 0; i < count; i++) {
                  const got = label(into.subarray(i * 4096, (i + 1) * 4096));
                  if (!snapshot[i]!.has(got) && !written.has(lba + i))
                    problems.push(`round ${round}: concurrent read of ${lba + i} saw ${got}`);
                }
              },
              (e: Error) => problems.push(`round ${round}: read failed: ${e.message}`),
            ),
          );
          continue;
        }
        let overlaps = false;
        for (let i = lba; i < lba + count; i++) if (written.has(i)) overlaps = true;
        if (overlaps) continue;
        const data = Buffer.alloc(count * 4096);
        for (let i = 0; i < count; i++) {
          written.add(lba + i);
          if (rnd() >= 0.1) content(1 + Math.floor(rnd() * 30), Math.floor(rnd() * 40)).copy(data, i * 4096);
        }
        const labels = Array.from({ length: count }, (_, i) =>
          label(data.subarray(i * 4096, (i + 1) * 4096)),
        );
        ops.push(
          dev.write(lba * 4096, data).then(
            () => labels.forEach((l, i) => (may[lba + i] = new Set([l]))),
            () => labels.forEach((l, i) => may[lba + i]!.add(l)),
          ),
        );
      }
      if (round % 4 === 0) ops.push(store.flush().catch(() => undefined));
      if (round % 7 === 3) ops.push(compactor.run(true).catch(() => undefined));
      await Promise.all(ops);
      const all = Buffer.alloc(BLOCKS * 4096);
      await dev.read(0, all);
      for (let i = 0; i < BLOCKS; i++) {
        const got = label(all.subarray(i * 4096, (i + 1) * 4096));
        if (!may[i]!.has(got))
          problems.push(`round ${round}: block ${i} reads ${got}, not one of ${[...may[i]!]}`);
        may[i] = new Set([got]);
      }
      assert.deepEqual(problems, []);
    }
    stopFaults();
    await store.flush(true);
    await store.collect();
  } finally {
    stopFaults();
    await compactor.close();
    await store.close();
    process.off('unhandledRejection', onUnhandled);
  }
  assert.deepEqual(unhandled, []);
  assert.deepEqual(fsckStore(dir).problems, []);
  const reopened = DedupStore.open(dir, silentLogger);
  const again = new DedupDevice(reopened, reopened.volumeId('a'), BLOCKS * 4096);
  const all = Buffer.alloc(BLOCKS * 4096);
  await again.read(0, all);
  await reopened.close();
  for (let i = 0; i < BLOCKS; i++)
    assert.equal(label(all.subarray(i * 4096, (i + 1) * 4096)), [...may[i]!][0]);
}

describe('dedup store under injected faults', () => {
  for (const seed of [1, 2, 3]) {
    it(`keeps every block at its old or new content through failed writes and commits (seed ${seed}, inline hashing)`, () =>
      run(seed, { pool: false }));
    it(`keeps every block at its old or new content through failed writes and commits (seed ${seed}, pooled hashing)`, () =>
      run(seed, { pool: true }));
  }
});
