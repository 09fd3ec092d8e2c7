// The dedup store under injected faults: concurrent, overlapping writes, reads and
// compactions while some segment writes fail and some index commits are refused.
// A write that succeeded reads back as written; one that failed reads back as what
// was there before or what it wrote, never anything else (never a hole where data
// was); nothing rejects unobserved; and fsck finds the store consistent at the end.
// Then a failed fdatasync: from it on nothing is acknowledged, and a reopened store
// is at its last durable state.

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

/** Takes blocks lba.. for one write of this round; false if another write has one of them. */
function claim(written: Set<number>, lba: number, count: number): boolean {
  for (let i = lba; i < lba + count; i++) if (written.has(i)) return false;
  for (let i = lba; i < lba + count; i++) written.add(i);
  return true;
}

/** `count` blocks of the few contents, about `zeroShare` of them zero. */
function someBlocks(rnd: () => number, count: number, zeroShare: number): Buffer {
  const data = Buffer.alloc(count * 4096);
  for (let i = 0; i < count; i++)
    if (rnd() >= zeroShare) content(1 + Math.floor(rnd() * 30), Math.floor(rnd() * 40)).copy(data, i * 4096);
  return data;
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
        if (!claim(written, lba, count)) continue;
        const data = someBlocks(rnd, count, 0.1);
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

/** The next fdatasync anywhere in this thread fails with EIO, as a lost writeback reports it. */
function failNextFdatasync(): () => void {
  const real = fs.fdatasync;
  let armed = true;
  fs.fdatasync = ((fd: number, cb: (err: NodeJS.ErrnoException | null) => void) => {
    if (!armed) return real(fd, cb);
    armed = false;
    const err = Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO', errno: -5 });
    process.nextTick(cb, err);
  }) as typeof fs.fdatasync;
  return () => {
    fs.fdatasync = real;
  };
}

/**
 * Writes and flushes until a segment fdatasync fails at a random round, then more
 * rounds. After the failure every write and flush must fail; after a reopen every
 * block must read as of the last flush that succeeded or as a write issued since.
 */
async function runSyncFailure(seed: number): Promise<void> {
  const rnd = random(seed);
  const dir = path.join(tmp, `sync${seed}`);
  const store = DedupStore.open(dir, silentLogger, { checkpointEntries: 40, metaCacheBytes: 1 << 20 });
  const dev = new DedupDevice(store, store.volumeId('a'), BLOCKS * 4096);
  const durable: string[] = new Array<string>(BLOCKS).fill('zero');
  const since: Array<Set<string>> = Array.from({ length: BLOCKS }, () => new Set());
  const failAt = 2 + Math.floor(rnd() * 5);
  let failedAt = -1;
  let restore = (): void => undefined;
  const problems: string[] = [];
  try {
    for (let round = 0; round < failAt + 4; round++) {
      if (round === failAt) restore = failNextFdatasync();
      const ops: Promise<void>[] = [];
      const written = new Set<number>();
      for (let k = 0; k < 8; k++) {
        const lba = Math.floor(rnd() * (BLOCKS - 100));
        const count = 1 + Math.floor(rnd() * 90);
        if (!claim(written, lba, count)) continue;
        const data = someBlocks(rnd, count, 0);
        for (let i = 0; i < count; i++) since[lba + i]!.add(label(data.subarray(i * 4096, (i + 1) * 4096)));
        ops.push(
          dev.write(lba * 4096, data).then(
            () => {
              if (failedAt >= 0) problems.push(`round ${round}: a write succeeded after the failed sync`);
            },
            (e: BlockError) => {
              if (failedAt < 0)
                problems.push(`round ${round}: write failed before any sync did: ${e.message}`);
              else if (e.code !== 'EIO') problems.push(`round ${round}: write failed with ${e.code}`);
            },
          ),
        );
      }
      await Promise.all(ops);
      const flushed = await store.flush().then(
        () => true,
        () => false,
      );
      if (!flushed && failedAt < 0) failedAt = round;
      if (flushed && failedAt >= 0) problems.push(`round ${round}: a flush succeeded after the failed sync`);
      const all = Buffer.alloc(BLOCKS * 4096);
      await dev.read(0, all);
      for (let i = 0; i < BLOCKS; i++) {
        const got = label(all.subarray(i * 4096, (i + 1) * 4096));
        if (got !== durable[i] && !since[i]!.has(got))
          problems.push(`round ${round}: block ${i} reads ${got}`);
        if (flushed) {
          durable[i] = got;
          since[i]!.clear();
        }
      }
      assert.deepEqual(problems, []);
    }
    assert.ok(failedAt >= failAt, 'the injected sync failure surfaced');
    assert.ok(store.segments.failed, 'the store remembers the failed sync');
  } finally {
    restore();
    await store.close();
  }
  // Back at its last durable checkpoint, and writable again.
  assert.deepEqual(fsckStore(dir).problems, []);
  const reopened = DedupStore.open(dir, silentLogger);
  const again = new DedupDevice(reopened, reopened.volumeId('a'), BLOCKS * 4096);
  const all = Buffer.alloc(BLOCKS * 4096);
  await again.read(0, all);
  for (let i = 0; i < BLOCKS; i++) {
    const got = label(all.subarray(i * 4096, (i + 1) * 4096));
    assert.ok(got === durable[i] || since[i]!.has(got), `block ${i} reopens as ${got}`);
  }
  await again.write(0, content(7, 7));
  await reopened.flush();
  await reopened.close();
  assert.deepEqual(fsckStore(dir).problems, []);
}

describe('dedup store after a failed fdatasync', () => {
  for (const seed of [4, 5, 6]) {
    it(`refuses every later write and flush, and reopens at its last durable state (seed ${seed})`, () =>
      runSyncFailure(seed));
  }
});
