import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import type { Worker } from 'node:worker_threads';
import { BlockError } from '../../gateway/device/errors';
import { DedupDevice } from '../../gateway/store/dedup-device';
import { DedupStore, StoreOptions } from '../../gateway/store/dedup-store';
import { fsckStore } from '../../gateway/store/fsck';
import { silentLogger } from '../../gateway/util/log';
import { KIND_DATA, KIND_ZERO } from '../../protocol/replication/block-kinds';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-write-path-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));
let n = 0;

function open(opts: StoreOptions = {}): { store: DedupStore; dir: string } {
  const dir = path.join(tmp, `s${n++}`);
  return { store: DedupStore.open(dir, silentLogger, opts), dir };
}

function block(byte: number, tail = 0): Buffer {
  const b = Buffer.alloc(4096, byte);
  b.writeUInt32BE(tail, 4092);
  return b;
}

type Append = DedupStore['segments']['append'];

/**
 * Holds the acknowledgement of the store's next segment append until the test settles
 * it. 'fail': nothing reaches the segment and settling rejects, as a full or broken
 * disk would; 'delay': the bytes are written, the acknowledgement waits. Either way a
 * checkpoint's sync waits for it, as it waits for a real write. `appended` resolves
 * once the append has been made.
 */
function interceptAppend(
  store: DedupStore,
  mode: 'fail' | 'delay',
): { settle: (err?: Error) => void; appended: Promise<void> } {
  const segments = store.segments;
  const inflight = (segments as unknown as { inflight: Set<Promise<void>> }).inflight;
  const original: Append = segments.append.bind(segments);
  let settle: (err?: Error) => void = () => undefined;
  const gate = new Promise<void>((resolve, reject) => {
    settle = (err) => (err ? reject(err) : resolve());
  });
  gate.catch(() => undefined);
  let appended: () => void = () => undefined;
  const made = new Promise<void>((r) => (appended = r));
  segments.append = (record: Buffer) => {
    segments.append = original;
    appended();
    const at = { segment: segments.currentSegment, offset: segments.currentBytes };
    const real = mode === 'fail' ? null : original(record);
    const written = real ? real.written.then(() => gate) : gate;
    inflight.add(written);
    written.then(
      () => inflight.delete(written),
      () => inflight.delete(written),
    );
    return real ? { ...real, written } : { ...at, written };
  };
  return { settle: (err) => settle(err), appended: made };
}

/** Holds the index writer's commits until the returned function lets them go. */
function holdCommits(store: DedupStore): () => void {
  const writer = (store as unknown as { writer: { commit: (r: unknown) => Promise<unknown> } }).writer;
  const commit = writer.commit.bind(writer);
  let release: () => void = () => undefined;
  const held = new Promise<void>((r) => (release = r));
  writer.commit = async (r) => {
    await held;
    return commit(r);
  };
  return () => release();
}

async function readAll(dev: DedupDevice, length: number): Promise<Buffer> {
  const out = Buffer.alloc(length);
  await dev.read(0, out);
  return out;
}

describe('dedup write path', () => {
  it('leaves a block as it was when the segment write of its new content fails', async () => {
    const { store, dir } = open();
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    await dev.write(0, block(1));
    await store.flush();
    const fault = interceptAppend(store, 'fail');
    const write = dev.write(0, block(2));
    fault.settle(new BlockError('EIO', 'injected segment write failure'));
    await assert.rejects(write, /injected/);
    assert.ok((await readAll(dev, 4096)).equals(block(1)));
    await store.close();
    assert.deepEqual(fsckStore(dir).problems, []);
  });

  it('does not share a block whose segment write is in flight until it lands, and stores its own copy if it fails', async () => {
    const { store, dir } = open();
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    const fault = interceptAppend(store, 'fail');
    const first = dev.write(0, block(5));
    // Same bytes elsewhere while the first copy is still on its way to the segment.
    const second = dev.write(4096, block(5));
    await new Promise((r) => setImmediate(r));
    fault.settle(new BlockError('EIO', 'injected segment write failure'));
    await assert.rejects(first, /injected/);
    await second;
    const got = await readAll(dev, 8192);
    assert.ok(got.subarray(0, 4096).equals(Buffer.alloc(4096)), 'the failed write left a hole');
    assert.ok(got.subarray(4096).equals(block(5)), 'the second write has its own copy');
    await store.flush();
    assert.equal((await store.stats()).uniqueBlocks, 1);
    await store.close();
    assert.deepEqual(fsckStore(dir).problems, []);
  });

  it('shares a block written by a request still in flight once its write lands', async () => {
    const { store, dir } = open();
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    const fault = interceptAppend(store, 'delay');
    const first = dev.write(0, block(6));
    const second = dev.write(4096, block(6));
    await new Promise((r) => setImmediate(r));
    fault.settle();
    await first;
    await second;
    await store.flush();
    const s = await store.stats();
    assert.equal(s.mappedBlocks, 2);
    assert.equal(s.uniqueBlocks, 1);
    assert.ok((await readAll(dev, 8192)).equals(Buffer.concat([block(6), block(6)])));
    await store.close();
    assert.deepEqual(fsckStore(dir).problems, []);
  });

  it('stores writes encoded on the pool exactly as inline ones', async () => {
    // Zero blocks, repeats inside the request, a block already stored, compressible and
    // incompressible blocks: every case the batch path distinguishes.
    const blocks: Buffer[] = [];
    for (let i = 0; i < 96; i++) {
      if (i % 7 === 0) blocks.push(Buffer.alloc(4096));
      else if (i % 5 === 0) blocks.push(block(9, 1));
      else if (i % 3 === 0) blocks.push(crypto.randomBytes(4096));
      else blocks.push(block(i, i));
    }
    const data = Buffer.concat(blocks);
    const results = [];
    for (const opts of [{ hashPoolMin: null }, { hashPoolMin: 8192 }]) {
      const { store, dir } = open(opts);
      const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
      await dev.write(0, block(9, 1)); // already stored when the batch arrives
      await dev.write(65536, data);
      assert.ok((await readAll(dev, 65536 + data.length)).subarray(65536).equals(data));
      const s = await store.stats();
      results.push({
        mapped: s.mappedBlocks,
        zero: s.zeroBlocks,
        unique: s.uniqueBlocks,
        stored: s.storedBytes,
      });
      await store.close();
      assert.deepEqual(fsckStore(dir).problems, []);
    }
    assert.deepEqual(results[1], results[0]);
  });

  it('stores a large write packed on the libuv pool exactly as the same blocks written a block at a time', async () => {
    // Enough new blocks for the pool (at least 64), with zero blocks, repeats and
    // incompressible blocks among them.
    const blocks: Buffer[] = [];
    for (let i = 0; i < 160; i++) {
      if (i % 11 === 0) blocks.push(Buffer.alloc(4096));
      else if (i % 7 === 0) blocks.push(block(9, 1));
      else if (i % 3 === 0) blocks.push(crypto.randomBytes(4096));
      else blocks.push(block(i, i));
    }
    const data = Buffer.concat(blocks);
    const results = [];
    for (const whole of [true, false]) {
      const { store, dir } = open({ hashPoolMin: null });
      const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
      if (whole) await dev.write(0, data);
      else for (let i = 0; i < blocks.length; i++) await dev.write(4096 * i, blocks[i]!);
      assert.ok((await readAll(dev, data.length)).equals(data));
      const s = await store.stats();
      results.push({ unique: s.uniqueBlocks, stored: s.storedBytes, zero: s.zeroBlocks });
      await store.close();
      assert.deepEqual(fsckStore(dir).problems, []);
    }
    assert.deepEqual(results[0], results[1]);
  });

  it("changes all of a large write's mappings in one tick, its zero blocks with its new ones", async () => {
    const { store } = open({ hashPoolMin: null });
    const vol = store.volumeId('a');
    const dev = new DedupDevice(store, vol, 1 << 20);
    await dev.write(0, crypto.randomBytes(80 * 4096));
    // Blocks 0-9 zero, 10-79 new: 70 new blocks, packed on the pool.
    const next = Buffer.concat([Buffer.alloc(10 * 4096), crypto.randomBytes(70 * 4096)]);
    const write = dev.write(0, next);
    assert.equal(store.captureRange(vol, 0, 1).kinds[0], KIND_DATA, 'the zero block waits for the new ones');
    await write;
    assert.equal(store.captureRange(vol, 0, 1).kinds[0], KIND_ZERO);
    assert.ok((await readAll(dev, next.length)).equals(next));
    await store.close();
  });

  it('fails a FLUSH when the index writer dies under it, and commits everything at the next', async () => {
    const { store, dir } = open();
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    await dev.write(0, block(1));
    await store.flush(); // the writer thread is running now
    const writer = (store as unknown as { writer: { worker: Worker | null } }).writer;
    const worker = writer.worker!;
    // The thread dies with the next checkpoint in its hands.
    worker.postMessage = () => void worker.terminate();
    await dev.write(4096, block(2));
    await assert.rejects(store.flush(), /index writer exited/);
    await dev.write(8192, block(3));
    await store.flush();
    await store.close();
    const reopened = DedupStore.open(dir, silentLogger);
    const again = new DedupDevice(reopened, reopened.volumeId('a'), 1 << 20);
    assert.ok((await readAll(again, 3 * 4096)).equals(Buffer.concat([block(1), block(2), block(3)])));
    await reopened.close();
    assert.deepEqual(fsckStore(dir).problems, []);
  });

  it('holds new writes while a checkpoint runs and the overlay is past its limit', async () => {
    // A new block is three overlay changes (metamap, datamap, reference count).
    const { store, dir } = open({ overlayLimit: 24 });
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    await dev.write(0, block(1));
    await store.flush();
    const release = holdCommits(store); // the next checkpoint sticks in its commit
    const blocks = Array.from({ length: 16 }, (_, i) => block(10 + i, i));
    await dev.write(0, Buffer.concat(blocks.slice(0, 8)));
    const checkpoint = store.flush(); // running, and stuck in its commit
    await dev.write(8 * 4096, Buffer.concat(blocks.slice(8, 12))); // the overlay still has room
    await dev.write(12 * 4096, Buffer.concat(blocks.slice(12, 16))); // reaches the limit
    let done = false;
    const throttled = dev.write(16 * 4096, block(99)).then(() => (done = true));
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(done, false, 'a write went ahead past the overlay limit');
    release();
    await checkpoint;
    await throttled;
    assert.ok((await readAll(dev, 17 * 4096)).equals(Buffer.concat([...blocks, block(99)])));
    await store.close();
    assert.deepEqual(fsckStore(dir).problems, []);
  });

  it('puts back an acknowledged block when its overwrite in the same checkpoint interval fails', async () => {
    const { store, dir } = open();
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    await dev.write(0, block(1)); // acknowledged, not yet in a checkpoint
    const fault = interceptAppend(store, 'fail');
    const overwrite = dev.write(0, block(2));
    await fault.appended;
    // The checkpoint freezes with block(1) born and released in its interval, while the
    // overwrite that released it is still in flight.
    const checkpoint = store.flush();
    fault.settle(new BlockError('EIO', 'injected segment write failure'));
    await assert.rejects(overwrite, /injected/);
    await assert.rejects(checkpoint, /injected/);
    assert.ok((await readAll(dev, 4096)).equals(block(1)), 'the old content is back');
    await store.flush();
    assert.ok((await readAll(dev, 4096)).equals(block(1)), 'and survives the next checkpoint');
    await store.close();
    assert.deepEqual(fsckStore(dir).problems, []);
  });

  it('settles a failed write only after every block of it has finished', async () => {
    const { store, dir } = open({ hashPoolMin: null });
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    // Two writes in flight whose blocks the request below will want to share.
    const firstFault = interceptAppend(store, 'fail');
    const first = dev.write(40960, block(5));
    await firstFault.appended;
    const secondFault = interceptAppend(store, 'delay');
    const second = dev.write(45056, block(6));
    await secondFault.appended;
    const request = dev.write(0, Buffer.concat([block(5), block(6)]));
    let settled = false;
    request.then(
      () => (settled = true),
      () => (settled = true),
    );
    await new Promise((r) => setImmediate(r));
    // Block 0 stops waiting for the failed first write and stores its own copy, which fails too.
    const ownFault = interceptAppend(store, 'fail');
    firstFault.settle(new BlockError('EIO', 'injected segment write failure'));
    await assert.rejects(first, /injected/);
    await ownFault.appended;
    ownFault.settle(new BlockError('EIO', 'injected segment write failure'));
    for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
    assert.equal(settled, false, 'the request answered while block 1 was still being stored');
    secondFault.settle();
    await second;
    await assert.rejects(request, /injected/);
    const got = await readAll(dev, 8192);
    assert.ok(got.subarray(0, 4096).equals(Buffer.alloc(4096)), 'block 0 failed and stays a hole');
    assert.ok(got.subarray(4096).equals(block(6)), 'block 1 was stored');
    await store.flush();
    await store.close();
    assert.deepEqual(fsckStore(dir).problems, []);
  });

  it('commits the counters as they were at the freeze, not as later writes left them', async () => {
    const { store, dir } = open();
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    const release = holdCommits(store);
    await dev.write(0, block(1));
    const checkpoint = store.flush();
    await dev.write(4096, block(2)); // after the freeze: the next checkpoint's
    release();
    await checkpoint;
    // The index as committed, as a crash now would leave it.
    assert.deepEqual(fsckStore(dir).problems, []);
    await store.close();
    assert.deepEqual(fsckStore(dir).problems, []);
  });

  it('drops a compaction move whose segment write fails, even when a failed checkpoint merges it back', async () => {
    const { store, dir } = open({ metaCacheBytes: 0 });
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    await dev.write(0, block(7));
    await store.flush();
    const id = store.captureRange(store.volumeId('a'), 0, 1).sources[0]!.id;
    const e = store.lookupData(id)!;
    const record = await store.segments.read(e.segment, e.offset, 40 + e.storedLength);
    const fault = interceptAppend(store, 'fail');
    const move = store.relocate(id, record);
    await fault.appended;
    const checkpoint = store.flush(); // freezes the move
    fault.settle(new BlockError('EIO', 'injected segment write failure'));
    await assert.rejects(move, /injected/);
    await assert.rejects(checkpoint, /injected/);
    await store.flush(true);
    assert.deepEqual(
      { segment: store.lookupData(id)!.segment, offset: store.lookupData(id)!.offset },
      { segment: e.segment, offset: e.offset },
      'the block stays where it was',
    );
    assert.ok((await readAll(dev, 4096)).equals(block(7)));
    await store.close();
    assert.deepEqual(fsckStore(dir).problems, []);
  });

  it('answers a failed write only once its blocks still being stored are done with its payload', async () => {
    const { store, dir } = open({ hashPoolMin: null });
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    const slow = interceptAppend(store, 'delay');
    const first = dev.write(40 * 4096, block(9)); // in flight: later copies of it wait
    await slow.appended;
    // The request's edge fails at once (its read-modify-write meets a damaged block) while
    // its whole blocks wait for the first write.
    const readBlock = store.readBlock.bind(store);
    store.readBlock = () => Promise.reject(new BlockError('EIO', 'injected damaged edge'));
    const payload = Buffer.concat([Buffer.alloc(512, 9), block(9), block(9)]);
    let settled = false;
    const request = dev.write(4096 - 512, payload).finally(() => (settled = true));
    request.catch(() => undefined);
    await new Promise((r) => setImmediate(r));
    assert.equal(settled, false, 'answered while its whole blocks were still being stored');
    slow.settle();
    await first;
    await assert.rejects(request, /injected damaged edge/);
    store.readBlock = readBlock;
    payload.fill(0x55); // the payload buffer goes back to the pool and is reused
    await store.flush();
    const got = Buffer.alloc(2 * 4096);
    await dev.read(4096, got);
    assert.ok(got.equals(Buffer.concat([block(9), block(9)])));
    await store.close();
    assert.deepEqual(fsckStore(dir).problems, []);
  });

  it('answers a write whose segment append throws only once its blocks still being stored are done', async () => {
    const { store, dir } = open({ hashPoolMin: null });
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    const slow = interceptAppend(store, 'delay');
    const first = dev.write(40 * 4096, block(9)); // in flight: the request's copy of it waits
    await slow.appended;
    // The request's own append throws at once, as opening a new segment file can.
    const segments = store.segments;
    const append = segments.append.bind(segments);
    segments.append = () => {
      segments.append = append;
      throw new BlockError('ENOSPC', 'injected: no room for a new segment');
    };
    const payload = Buffer.concat([block(9), block(1), block(2)]);
    let settled = false;
    const request = dev.write(0, payload).finally(() => (settled = true));
    request.catch(() => undefined);
    await new Promise((r) => setImmediate(r));
    assert.equal(settled, false, 'answered while block 0 was still being stored');
    slow.settle();
    await first;
    await assert.rejects(request, /no room/);
    payload.fill(0x55); // the payload buffer goes back to the pool and is reused
    await store.flush();
    assert.ok((await readAll(dev, 4096)).equals(block(9)));
    await store.close();
    assert.deepEqual(fsckStore(dir).problems, []);
  });

  it('never leaves the failure of a block it waited for unobserved while the rest of its request is written', async () => {
    const { store, dir } = open({ hashPoolMin: null });
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    const unhandled: unknown[] = [];
    const onUnhandled = (e: unknown): void => void unhandled.push(e);
    process.on('unhandledRejection', onUnhandled);
    try {
      const firstCopy = interceptAppend(store, 'fail');
      const first = dev.write(40 * 4096, block(9)); // in flight: the request's copy of it waits
      first.catch(() => undefined);
      await firstCopy.appended;
      const ownRecords = interceptAppend(store, 'delay'); // the request's new block, held
      const request = dev.write(0, Buffer.concat([block(9), block(1)]));
      request.catch(() => undefined);
      await ownRecords.appended;
      // The first copy is lost: the waiting block stores its own, and that write fails too,
      // while the request's other record is still on its way.
      const ownCopy = interceptAppend(store, 'fail');
      firstCopy.settle(new BlockError('EIO', 'injected: first copy lost'));
      await ownCopy.appended;
      ownCopy.settle(new BlockError('EIO', 'injected: own copy lost'));
      await new Promise((r) => setImmediate(r));
      ownRecords.settle();
      await assert.rejects(request, /own copy lost/);
      await assert.rejects(first, /first copy lost/);
      await new Promise((r) => setImmediate(r));
      assert.deepEqual(unhandled, []);
    } finally {
      process.off('unhandledRejection', onUnhandled);
    }
    await store.close();
    assert.deepEqual(fsckStore(dir).problems, []);
  });

  it('fails only the write whose new segment file cannot be opened: FLUSH and later writes go on', async () => {
    const { store, dir } = open();
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    const openSync = fs.openSync;
    fs.openSync = ((...args: Parameters<typeof fs.openSync>) => {
      if (String(args[0]).endsWith('.seg')) {
        fs.openSync = openSync;
        throw Object.assign(new Error('EMFILE: too many open files (injected)'), { code: 'EMFILE' });
      }
      return openSync(...args);
    }) as typeof fs.openSync;
    try {
      await assert.rejects(dev.write(0, block(1)), /EMFILE|too many open files/);
    } finally {
      fs.openSync = openSync;
    }
    await store.flush(true);
    await dev.write(4096, block(2));
    await store.flush();
    assert.ok((await readAll(dev, 8192)).equals(Buffer.concat([Buffer.alloc(4096), block(2)])));
    await store.close();
    assert.deepEqual(fsckStore(dir).problems, []);
  });

  it('after a failed fdatasync, believes no retry: refuses checkpoints and writes, and reopens at the last durable checkpoint', async () => {
    const { store, dir } = open();
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    await dev.write(0, block(1));
    await store.flush();
    await dev.write(4096, block(2));
    const fdatasync = fs.fdatasync;
    fs.fdatasync = ((fd: number, callback: (err: NodeJS.ErrnoException | null) => void) => {
      fs.fdatasync = fdatasync;
      void fd;
      callback(Object.assign(new Error('EIO: i/o error, fdatasync (injected)'), { code: 'EIO' }));
    }) as typeof fs.fdatasync;
    try {
      await assert.rejects(store.flush(), /fdatasync/);
    } finally {
      fs.fdatasync = fdatasync;
    }
    // Linux would now answer a second fdatasync with success, the failed pages never written.
    await assert.rejects(store.flush(true), /until the gateway restarts/);
    await assert.rejects(dev.write(8192, block(3)), { code: 'EIO' });
    await store.close();
    const reopened = DedupStore.open(dir, silentLogger);
    const again = new DedupDevice(reopened, reopened.volumeId('a'), 1 << 20);
    assert.ok((await readAll(again, 4096)).equals(block(1)), 'the last durable checkpoint');
    await reopened.close();
    assert.deepEqual(fsckStore(dir).problems, []);
  });
});
