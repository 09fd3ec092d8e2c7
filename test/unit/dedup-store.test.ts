import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { ExtentFlag } from '../../gateway/device/block-device';
import { BlockError } from '../../gateway/device/errors';
import { DedupDevice } from '../../gateway/store/dedup-device';
import { DedupStore } from '../../gateway/store/dedup-store';
import { fsckStore } from '../../gateway/store/fsck';
import { openIndex } from '../../gateway/store/index-db';
import type { Database } from 'lmdb';
import { dataEntries, dataPageKeyInto, entryOffset } from '../../gateway/store/data-pages';
import {
  DATA_ENTRY,
  encodeId,
  EntryFlag,
  encodeMetaKey,
  RECORD_HEADER,
  segmentFileName,
} from '../../gateway/store/layout';
import { Compactor } from '../../gateway/store/compactor';
import { silentLogger } from '../../gateway/util/log';
import { KIND_DATA, KIND_ZERO } from '../../protocol/replication/block-kinds';
import { native } from '../../native-bindings';
import { IoBatcher } from '../../gateway/device/io-batcher';
import { setMetaEntry } from '../helpers/metamap';
import { encodeRecord } from '../../gateway/store/block-codec';
import { forEachMeta } from '../../gateway/store/meta-pages';

/** What the compaction test reads of an IoBatcher's private state. */
interface BatcherState {
  write: boolean;
  buffers: Buffer[];
}

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-store-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));
let n = 0;

function fresh(): DedupStore {
  return DedupStore.open(path.join(tmp, `s${n++}`), silentLogger);
}

function block(byte: number, tail = 0): Buffer {
  const b = Buffer.alloc(4096, byte);
  b.writeUInt32BE(tail, 4092);
  return b;
}

/** A fresh store with volume 'a' as a 1 MiB device, and the directory it lives in. */
function freshVolume(prefix = 's'): { dir: string; store: DedupStore; dev: DedupDevice } {
  const dir = path.join(tmp, `${prefix}${n++}`);
  const store = DedupStore.open(dir, silentLogger);
  return { dir, store, dev: new DedupDevice(store, store.volumeId('a'), 1 << 20) };
}

/** Closes the store and checks it offline. */
async function closeConsistent(store: DedupStore, dir: string): Promise<void> {
  await store.close();
  assert.deepEqual(fsckStore(dir).problems, []);
}

/** Cuts the datamap page holding block `id` short, as a damaged index value would be. */
async function damagePage(dir: string, id: number): Promise<void> {
  const { env, data } = openIndex(dir);
  const key = dataPageKeyInto(id, Buffer.alloc(8));
  await data!.put(key, Buffer.from(data!.get(key)!).subarray(0, 100));
  await env.close();
}

/** The store in `dir` opened again, with volume 'a' as a 1 MiB device. */
function reopenVolume(dir: string): { store: DedupStore; dev: DedupDevice } {
  const store = DedupStore.open(dir, silentLogger);
  return { store, dev: new DedupDevice(store, store.volumeId('a'), 1 << 20) };
}

/** Blocks 0-39 written (ids 1-40: datamap pages 0 and 1), then the page holding `id` damaged; reopened. */
async function damagedVolume(id: number): Promise<{ dir: string; store: DedupStore; dev: DedupDevice }> {
  const { dir, store, dev } = freshVolume();
  await dev.write(0, Buffer.concat(Array.from({ length: 40 }, (_, i) => block(i + 1, i))));
  await store.close();
  await damagePage(dir, id);
  return { dir, ...reopenVolume(dir) };
}

/** Changes block `id`'s datamap entry (its 36 bytes, in place) in its page, as a damaged index would. */
async function editEntry(
  data: Database<Buffer, Buffer>,
  id: number,
  edit: (entry: Buffer) => void,
): Promise<void> {
  const key = dataPageKeyInto(id, Buffer.alloc(8));
  const page = Buffer.from(data.get(key)!);
  const at = entryOffset(page, id);
  assert.ok(at >= 0, `block ${id} has a datamap entry`);
  edit(page.subarray(at, at + DATA_ENTRY));
  await data.put(key, page);
}

/**
 * Rewrites a closed store's datamap as stores before pages kept it, an entry per block
 * id in the old tree. Returns the entries.
 */
async function unpageDatamap(dir: string): Promise<number> {
  const { env, data, legacyData } = openIndex(dir);
  let n = 0;
  for (const { id, entry } of dataEntries({ data, legacyData: undefined }, (err) => assert.fail(err))) {
    await legacyData!.put(encodeId(id), Buffer.from(entry));
    n++;
  }
  await data!.clearAsync();
  await env.close();
  return n;
}

/**
 * Rewrites a closed store's metamap as stores before pages kept it, an entry per block in
 * the old tree. Returns the entries.
 */
async function unpageMetamap(dir: string): Promise<number> {
  const { env, meta, legacyMeta } = openIndex(dir);
  const entries: Array<[number, number, number]> = [];
  forEachMeta(meta!, null, (volume, lba, id) => entries.push([volume, lba, id]));
  for (const [volume, lba, id] of entries) await legacyMeta!.put(encodeMetaKey(volume, lba), encodeId(id));
  await meta!.clearAsync();
  await env.close();
  return entries.length;
}

/** The store's next segment append reports EIO once its bytes are written (the write, not the disk, fails). */
function failNextAppend(store: DedupStore): void {
  const segments = store.segments;
  const append = segments.append.bind(segments);
  segments.append = (record: Buffer) => {
    segments.append = append;
    const r = append(record);
    return { ...r, written: r.written.then(() => Promise.reject(new BlockError('EIO', 'injected'))) };
  };
}

/** Flips a bit of the hash in the first datamap entry (block 1) of a closed store. */
async function flipEntryHashBit(dir: string): Promise<void> {
  const { env, data } = openIndex(dir);
  await editEntry(data!, 1, (entry) => (entry[25] = entry[25]! ^ 0x01));
  await env.close();
}

describe('dedup store', () => {
  it('stores a block written to many places once', async () => {
    const store = fresh();
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    for (let i = 0; i < 16; i++) await dev.write(i * 4096, block(7));
    await store.flush();
    const s = await store.stats();
    assert.equal(s.mappedBlocks, 16);
    assert.equal(s.uniqueBlocks, 1);
    assert.equal(s.dedupRatio, 16);
    await store.close();
  });

  it('shares blocks across volumes', async () => {
    const store = fresh();
    const a = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    const b = new DedupDevice(store, store.volumeId('b'), 1 << 20);
    await a.write(0, Buffer.concat([block(1), block(2)]));
    await b.write(8192, Buffer.concat([block(2), block(1)]));
    await store.flush();
    assert.equal((await store.stats()).uniqueBlocks, 2);
    const got = Buffer.alloc(8192);
    await b.read(8192, got);
    assert.ok(got.equals(Buffer.concat([block(2), block(1)])));
    await store.close();
  });

  it('never stores zero blocks and reports them as ZERO, unwritten ones as HOLE|ZERO', async () => {
    const store = fresh();
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    await dev.write(4096, Buffer.alloc(8192));
    await dev.write(0, block(3));
    await store.flush();
    assert.equal((await store.stats()).uniqueBlocks, 1);
    assert.deepEqual(await dev.blockStatus(0, 5 * 4096), [
      { length: 4096, flags: 0 },
      { length: 8192, flags: ExtentFlag.ZERO },
      { length: 8192, flags: ExtentFlag.HOLE | ExtentFlag.ZERO },
    ]);
    await store.close();
  });

  it('unfiles a deleted block from the hash index, whether born in the epoch or committed before', async () => {
    const store = fresh();
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    const filed = (): number => (store as unknown as { hashIndex: { size: number } }).hashIndex.size;
    await dev.write(0, block(1));
    await store.flush();
    await dev.write(0, block(2)); // block 1 reaches zero references at the next checkpoint
    await dev.write(4096, block(3));
    await dev.write(4096, block(4)); // block 3 is born and released in one epoch
    await store.flush();
    await store.flush(true); // the checkpoint that deletes block 1
    assert.equal((await store.stats()).uniqueBlocks, 2);
    assert.equal(filed(), 2);
    await store.close();
  });

  it('unfiles every block one checkpoint deletes, past the writer’s first reply table (4096)', async () => {
    const store = fresh();
    const blocks = 5000;
    const dev = new DedupDevice(store, store.volumeId('a'), blocks * 4096);
    const filed = (): number => (store as unknown as { hashIndex: { size: number } }).hashIndex.size;
    const chunk = Buffer.alloc(250 * 4096);
    for (let first = 0; first < blocks; first += 250) {
      for (let b = 0; b < 250; b++) chunk.writeUInt32BE(first + b + 1, b * 4096);
      await dev.write(first * 4096, chunk);
    }
    await store.flush();
    assert.equal(filed(), blocks);
    await dev.trim(0, blocks * 4096);
    await store.flush();
    await store.flush(true);
    assert.equal((await store.stats()).uniqueBlocks, 0);
    assert.equal(filed(), 0);
    await store.close();
  });

  it('keeps written records in memory for captures only while a mirror is attached', async () => {
    const store = fresh();
    const volume = store.volumeId('a');
    const dev = new DedupDevice(store, volume, 1 << 20);
    await dev.write(0, block(1, 1));
    // Written before any mirror: a capture reads it from its segment.
    assert.equal(store.captureRange(volume, 0, 1).sources[0]!.record, undefined);
    const detach = store.attachMirror();
    await dev.write(4096, block(1, 2));
    const kept = store.captureRange(volume, 1, 1).sources[0]!.record;
    assert.ok(kept);
    detach();
    await dev.write(8192, block(1, 3));
    assert.equal(store.captureRange(volume, 2, 1).sources[0]!.record, undefined);
    await store.close();
  });

  it('says a 4 KiB write applied while its segment write is in flight, and a capture then holds it', async () => {
    const store = fresh();
    const volume = store.volumeId('a');
    const dev = new DedupDevice(store, volume, 1 << 20);
    let capture: ReturnType<DedupStore['captureRange']> | undefined;
    await dev.write(8192, block(7, 1), { applied: () => (capture = store.captureRange(volume, 2, 1)) });
    assert.ok(capture);
    assert.deepEqual(capture.cids, store.captureRange(volume, 2, 1).cids);
    // No mirror is attached, so a record held in memory is one whose write was still in flight.
    assert.ok(capture.sources[0]!.record, 'captured before the segment write completed');
    await store.close();
  });

  it('says a whole-block batch write applied once, in flight, with every block mapped', async () => {
    const store = fresh();
    const volume = store.volumeId('a');
    const dev = new DedupDevice(store, volume, 1 << 20);
    const data = Buffer.concat([block(1, 1), Buffer.alloc(4096), block(1, 1), block(2, 2)]);
    let calls = 0;
    let capture: ReturnType<DedupStore['captureRange']> | undefined;
    await dev.write(0, data, {
      applied: () => {
        calls++;
        capture = store.captureRange(volume, 0, 4);
      },
    });
    assert.equal(calls, 1);
    assert.deepEqual([...capture!.kinds], [KIND_DATA, KIND_ZERO, KIND_DATA, KIND_DATA]);
    assert.deepEqual(capture!.cids, store.captureRange(volume, 0, 4).cids);
    assert.ok(capture!.sources.every((s) => s.record !== undefined));
    await store.close();
  });

  it('never says an unaligned write applied early: it applies in parts', async () => {
    const store = fresh();
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    let calls = 0;
    await dev.write(512, Buffer.alloc(3 * 4096, 9), { applied: () => calls++ });
    assert.equal(calls, 0);
    await store.close();
  });

  it('drops a block once its last reference is overwritten', async () => {
    const store = fresh();
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    await dev.write(0, block(1));
    await dev.write(4096, block(1));
    await store.flush();
    await dev.write(0, block(2));
    await dev.trim(4096, 4096);
    await store.flush();
    const s = await store.stats();
    assert.equal(s.uniqueBlocks, 1);
    assert.equal(s.mappedBlocks, 1);
    assert.ok(s.reclaimableBytes > 0);
    await store.close();
  });

  it('deletes a block in the checkpoint that takes its last reference', async () => {
    const { dir, store, dev } = freshVolume('s');
    await dev.write(0, block(1));
    await store.flush();
    await dev.write(0, block(2));
    await store.flush();
    assert.equal((await store.stats()).uniqueBlocks, 1);
    await closeConsistent(store, dir);
  });

  it('leaves a block the running checkpoint may delete where it is when asked to move it', async () => {
    const { dir, store, dev } = freshVolume();
    await dev.write(0, block(1));
    await store.flush();
    const id = store.captureRange(store.volumeId('a'), 0, 1).sources[0]!.id;
    const e = store.lookupData(id)!;
    const record = await store.segments.read(e.segment, e.offset, RECORD_HEADER + e.storedLength);
    await dev.write(0, block(2)); // block(1)'s last reference goes at the next checkpoint
    const checkpoint = store.flush();
    assert.equal(await store.relocate(id, record), false);
    await checkpoint;
    assert.equal((await store.stats()).uniqueBlocks, 1);
    await closeConsistent(store, dir);
  });

  it('serves a block the running checkpoint takes a reference from, and stores its content anew meanwhile', async () => {
    const { dir, store, dev } = freshVolume('s');
    await dev.write(0, block(1));
    await dev.write(4096, block(1));
    await store.flush();
    await dev.write(0, block(2)); // block(1) keeps the reference at block 1
    const checkpoint = store.flush();
    const got = Buffer.alloc(4096);
    await dev.read(4096, got);
    assert.ok(got.equals(block(1)));
    await dev.write(8192, block(1)); // while the checkpoint may delete block(1): a copy
    await checkpoint;
    await store.flush();
    for (const lba of [1, 2]) {
      await dev.read(lba * 4096, got);
      assert.ok(got.equals(block(1)), `block ${lba}`);
    }
    assert.equal((await store.stats()).uniqueBlocks, 3);
    await closeConsistent(store, dir);
  });

  it("counts each volume's own data blocks through overwrites, zeroes, trims and a reopen", async () => {
    const { dir, store, dev } = freshVolume();
    const b = new DedupDevice(store, store.volumeId('b'), 1 << 20);
    await dev.write(0, Buffer.concat([block(1), block(2), block(3), block(4)]));
    await b.write(0, block(1)); // shared content counts for both volumes
    await dev.write(4096, block(5)); // an overwrite: still one block
    await dev.write(8192, Buffer.alloc(4096)); // zeroes are not data
    await dev.trim(12288, 4096);
    const a = store.volumeId('a');
    assert.equal(store.volumeDataBlocks(a), 2);
    assert.equal(store.volumeDataBlocks(store.volumeId('b')), 1);
    await closeConsistent(store, dir);
    const again = DedupStore.open(dir, silentLogger);
    assert.equal(again.volumeDataBlocks(a), 2);
    await again.deleteVolume('a');
    assert.equal(again.volumeDataBlocks(a), 0);
    await closeConsistent(again, dir);
  });

  it('counts the data blocks at open for a store that never recorded them per volume', async () => {
    const { dir, store, dev } = freshVolume();
    await dev.write(0, Buffer.concat([block(1), Buffer.alloc(4096), block(2)]));
    await store.close();
    const { env, state } = openIndex(dir);
    const older = { ...(state.get('store') as Record<string, unknown>) };
    delete older['volumeBlocks'];
    await state.put('store', older);
    await env.close();
    const again = DedupStore.open(dir, silentLogger);
    assert.equal(again.volumeDataBlocks(again.volumeId('a')), 2);
    await closeConsistent(again, dir);
  });

  it('keeps flushed writes across a close and reopen', async () => {
    const dir = path.join(tmp, `s${n++}`);
    let store = DedupStore.open(dir, silentLogger);
    let dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    await dev.write(1000, Buffer.alloc(10000, 0x5c));
    await dev.flush();
    await store.close();
    store = DedupStore.open(dir, silentLogger);
    dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    const got = Buffer.alloc(12000);
    await dev.read(0, got);
    assert.ok(got.subarray(1000, 11000).every((b) => b === 0x5c));
    assert.ok(got.subarray(0, 1000).every((b) => b === 0));
    await store.close();
  });

  /**
   * A store whose volume 'a' holds blocks 0-1 (ids 1-2) and block(9) at block 2, closed
   * and reopened with bytes of the first record's payload (block 0's) overwritten.
   */
  async function storeWithDamagedFirstRecord(): Promise<DedupStore> {
    const dir = path.join(tmp, `s${n++}`);
    const store = DedupStore.open(dir, silentLogger);
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    const data = Buffer.alloc(8192);
    for (let i = 0; i < data.length; i++) data[i] = (i * 31) % 251;
    await dev.write(0, data);
    await dev.write(8192, block(9));
    await dev.flush();
    await store.close();
    const seg = path.join(dir, 'segments', fs.readdirSync(path.join(dir, 'segments'))[0]!);
    const fd = fs.openSync(seg, 'r+');
    fs.writeSync(fd, Buffer.from([0xff, 0xff, 0xff]), 0, 3, 60); // inside the first record's payload
    fs.closeSync(fd);
    return DedupStore.open(dir, silentLogger);
  }

  it('answers EIO for a block whose segment bytes were corrupted, and serves the others', async () => {
    const store = await storeWithDamagedFirstRecord();
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    await assert.rejects(dev.read(0, Buffer.alloc(4096)), { code: 'EIO' });
    const other = Buffer.alloc(4096);
    await dev.read(8192, other);
    assert.ok(other.equals(block(9)));
    await store.close();
  });

  it('scrubs a volume: names the blocks whose stored bytes are damaged, and offers their copies no more', async () => {
    const store = await storeWithDamagedFirstRecord();
    const vol = store.volumeId('a');
    assert.deepEqual(await store.scrub(vol, 1, 255), [], 'the rest reads back whole');
    // A mirrored batch naming block 0's content finds it stored until the scrub.
    const ranges = [{ lba: 0, kinds: Buffer.of(KIND_DATA), cids: store.captureRange(vol, 0, 1).cids }];
    assert.deepEqual(store.missingContent(ranges), []);
    assert.deepEqual(await store.scrub(vol, 0, 256), [0]);
    assert.deepEqual(store.missingContent(ranges), [0]);
    await store.close();
  });

  it('mends a damaged block with good bytes, and leaves it damaged, not a hole, when the new copy cannot be written', async () => {
    const good = Buffer.alloc(4096);
    for (let i = 0; i < good.length; i++) good[i] = (i * 31) % 251; // block 0 as written
    for (const failing of [true, false]) {
      const store = await storeWithDamagedFirstRecord();
      const vol = store.volumeId('a');
      assert.deepEqual(await store.scrub(vol, 0, 256), [0]);
      if (failing) failNextAppend(store);
      const mended = await store.mendBlocks(vol, [{ lba: 0, block: { payload: good, lz4: false } }]);
      const dev = new DedupDevice(store, vol, 1 << 20);
      if (failing) {
        assert.deepEqual(mended, []);
        await assert.rejects(dev.read(0, Buffer.alloc(4096)), { code: 'EIO' });
      } else {
        assert.deepEqual(mended, [0]);
        const got = Buffer.alloc(4096);
        await dev.read(0, got);
        assert.ok(got.equals(good));
      }
      await store.close();
    }
  });

  it('scrubs behind clients: it pauses after a window read while they were served, never while they are idle', async () => {
    const store = DedupStore.open(path.join(tmp, `s${n++}`), silentLogger);
    const vol = store.volumeId('a');
    const dev = new DedupDevice(store, vol, 4 << 20);
    await dev.write(0, Buffer.concat(Array.from({ length: 768 }, (_v, i) => block(i % 251, i))));
    const sleeps: number[] = [];
    const opts = { yieldToClients: true, sleep: async (ms: number) => void sleeps.push(ms) };
    assert.deepEqual(await store.scrub(vol, 0, 768, opts), []);
    assert.deepEqual(sleeps, [], 'no client, no pause');
    const scrub = store.scrub(vol, 0, 768, opts);
    await dev.read(0, Buffer.alloc(4096)); // served while the first window is read
    assert.deepEqual(await scrub, []);
    assert.ok(sleeps.length >= 1, 'a pause after the busy window');
    await store.close();
  });

  /**
   * storeWithDamagedFirstRecord with a snapshot of volume 'a' sharing the damaged copy, which
   * a scrub found; closed (the flag committed). `good` is block 0 as written.
   */
  async function scrubbedWithSnapshot(): Promise<{ good: Buffer; dir: string; vol: number; snap: number }> {
    const good = Buffer.alloc(4096);
    for (let i = 0; i < good.length; i++) good[i] = (i * 31) % 251;
    const store = await storeWithDamagedFirstRecord();
    const vol = store.volumeId('a');
    const snap = store.snapshotVolume(vol, 'a@1', 256);
    await store.flush();
    assert.deepEqual(await store.scrub(vol, 0, 256), [0]);
    await store.close();
    return { good, dir: store.dir, vol, snap };
  }

  it('mends a damaged copy in place: a snapshot sharing it reads the good bytes too, across a restart, and fsck agrees', async () => {
    const { good, dir, vol, snap } = await scrubbedWithSnapshot();
    let store = DedupStore.open(dir, silentLogger);
    const ranges = [{ lba: 0, kinds: Buffer.of(KIND_DATA), cids: store.captureRange(vol, 0, 1).cids }];
    assert.deepEqual(store.missingContent(ranges), [0]);

    assert.deepEqual(await store.mendBlocks(vol, [{ lba: 0, block: { payload: good, lz4: false } }]), [0]);
    // Offered by its content id again: the same copy, mended.
    assert.deepEqual(store.missingContent(ranges), []);
    for (const v of [vol, snap]) {
      const got = Buffer.alloc(4096);
      await new DedupDevice(store, v, 1 << 20).read(0, got);
      assert.ok(got.equals(good), `volume ${v} reads the mended block`);
    }
    await store.close();

    assert.deepEqual(fsckStore(dir).problems, []);
    store = DedupStore.open(dir, silentLogger);
    assert.deepEqual(await store.scrub(vol, 0, 256), []);
    assert.deepEqual(await store.scrub(snap, 0, 256), []);
    assert.deepEqual(store.missingContent(ranges), []);
    await store.close();
  });

  it('mends a damaged copy from a new write of its content: a snapshot sharing it reads it again, across a restart', async () => {
    const { good, dir, vol, snap } = await scrubbedWithSnapshot();
    let store = DedupStore.open(dir, silentLogger);
    // A client writes the same bytes elsewhere: a new copy (the damaged one is offered no more),
    // and the damaged copy is written again from it.
    const dev = new DedupDevice(store, vol, 1 << 20);
    await dev.write(5 * 4096, good);
    await dev.flush();
    const got = Buffer.alloc(4096);
    await new DedupDevice(store, snap, 1 << 20).read(0, got);
    assert.ok(got.equals(good), "the snapshot's block reads back");
    await store.close();

    assert.deepEqual(fsckStore(dir).problems, []);
    store = DedupStore.open(dir, silentLogger);
    assert.deepEqual(await store.scrub(vol, 0, 256), []);
    assert.deepEqual(await store.scrub(snap, 0, 256), []);
    await store.close();
  });

  it('keeps a mend not yet committed when the compactor copies the block, and when that copy fails', async () => {
    for (const failing of [false, true]) {
      const { good, dir, vol, snap } = await scrubbedWithSnapshot();
      let store = DedupStore.open(dir, silentLogger);
      const { sources } = store.captureRange(vol, 0, 1);
      const { id, hash } = sources[0]!;
      // The new copy's write mends block `id` (a move in the live overlay, not yet committed)...
      await new DedupDevice(store, vol, 1 << 20).write(5 * 4096, good);
      // ...and the compactor copies the mended record on before any checkpoint.
      if (failing) failNextAppend(store);
      const copied = store.relocate(id, encodeRecord(id, good, hash));
      if (failing) await assert.rejects(copied, { code: 'EIO' });
      else assert.equal(await copied, true);
      await store.flush();
      const got = Buffer.alloc(4096);
      await new DedupDevice(store, snap, 1 << 20).read(0, got);
      assert.ok(got.equals(good), `the mended block reads back (copy ${failing ? 'failed' : 'landed'})`);
      await store.close();

      const { env, data } = openIndex(dir);
      const page = data!.getBinary(dataPageKeyInto(id, Buffer.alloc(8)))!;
      const flags = page.readUInt16BE(entryOffset(page, id) + 12);
      await env.close();
      assert.equal(flags & EntryFlag.DAMAGED, 0, 'the entry is no longer flagged damaged');
      assert.deepEqual(fsckStore(dir).problems, []);
      store = DedupStore.open(dir, silentLogger);
      assert.deepEqual(await store.scrub(snap, 0, 256), []);
      await store.close();
    }
  });

  it('keeps a scrubbed block from being offered by its content id after a restart', async () => {
    let store = await storeWithDamagedFirstRecord();
    const dir = store.dir;
    const vol = store.volumeId('a');
    const ranges = [{ lba: 0, kinds: Buffer.of(KIND_DATA), cids: store.captureRange(vol, 0, 1).cids }];
    assert.deepEqual(await store.scrub(vol, 0, 256), [0]);
    await store.close(); // its final checkpoint flags the block in the datamap
    store = DedupStore.open(dir, silentLogger);
    assert.deepEqual(store.missingContent(ranges), [0]);
    // Still read as damaged, not as something else.
    await assert.rejects(new DedupDevice(store, vol, 1 << 20).read(0, Buffer.alloc(4096)), { code: 'EIO' });
    await store.close();
  });

  it('answers EIO for a long read through a corrupted record, decoded on the pool, and serves the rest', async () => {
    const dir = path.join(tmp, `s${n++}`);
    let store = DedupStore.open(dir, silentLogger);
    let dev = new DedupDevice(store, store.volumeId('a'), 4 << 20);
    const data = Buffer.alloc(2 << 20);
    for (let b = 0; b < 512; b++) data.write(`block ${b} `.repeat(300), b * 4096);
    await dev.write(0, data);
    await dev.flush();
    await store.close();
    // A byte in the payload of a record past the first 64 (the pool decodes runs of 64 and more).
    const seg = path.join(dir, 'segments', fs.readdirSync(path.join(dir, 'segments'))[0]!);
    const segBytes = fs.readFileSync(seg);
    const victim = segBytes.indexOf('block 100 ');
    assert.ok(victim > 0);
    const fd = fs.openSync(seg, 'r+');
    fs.writeSync(fd, Buffer.from([0x00]), 0, 1, victim + 3);
    fs.closeSync(fd);
    store = DedupStore.open(dir, silentLogger);
    dev = new DedupDevice(store, store.volumeId('a'), 4 << 20);
    await assert.rejects(dev.read(0, Buffer.alloc(1 << 20)), { code: 'EIO' });
    const rest = Buffer.alloc(1 << 20);
    await dev.read(1 << 20, rest);
    assert.ok(rest.equals(data.subarray(1 << 20)));
    const beside = Buffer.alloc(4096);
    await dev.read(99 * 4096, beside);
    assert.ok(beside.equals(data.subarray(99 * 4096, 100 * 4096)));
    await store.close();
  });

  it('names the block where a long read runs past a segment cut short, and serves the blocks before it', async () => {
    const dir = path.join(tmp, `s${n++}`);
    let store = DedupStore.open(dir, silentLogger);
    let dev = new DedupDevice(store, store.volumeId('a'), 4 << 20);
    const data = Buffer.alloc(80 * 4096);
    for (let b = 0; b < 80; b++) data.write(`block ${b} `.repeat(300), b * 4096);
    await dev.write(0, data);
    await dev.flush();
    await store.close();
    // The file ends inside block 70's record (its lz4 payload starts with that text): 70 to 79 are gone.
    const seg = path.join(dir, 'segments', fs.readdirSync(path.join(dir, 'segments'))[0]!);
    fs.truncateSync(seg, fs.readFileSync(seg).indexOf('block 70 ') + 4);
    const errors: string[] = [];
    const log = { ...silentLogger, error: (m: string) => void errors.push(m), child: () => log };
    store = DedupStore.open(dir, log);
    dev = new DedupDevice(store, store.volumeId('a'), 4 << 20);
    await assert.rejects(dev.read(0, Buffer.alloc(80 * 4096)), { code: 'EIO' });
    // The read's first damaged block is named (as for a corrupted record), not a bare EIO.
    assert.ok(
      errors.some((m) => /volume a block 70: /.test(m)),
      errors.join('\n'),
    );
    assert.ok(!errors.some((m) => /volume a block 69: /.test(m)), errors.join('\n'));
    const before = Buffer.alloc(70 * 4096);
    await dev.read(0, before);
    assert.ok(before.equals(data.subarray(0, 70 * 4096)));
    await store.close();
  });

  it('answers EIO for a block whose datamap entry was corrupted, and serves the others', async () => {
    const dir = path.join(tmp, `s${n++}`);
    let store = DedupStore.open(dir, silentLogger);
    let dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    await dev.write(0, Buffer.concat([block(1), block(2)]));
    await dev.flush();
    await store.close();
    await flipEntryHashBit(dir);
    store = DedupStore.open(dir, silentLogger);
    dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    // Twice: a failed read must not leave a hint that makes the next one succeed.
    await assert.rejects(dev.read(0, Buffer.alloc(4096)), { code: 'EIO' });
    await assert.rejects(dev.read(0, Buffer.alloc(8192)), { code: 'EIO' });
    const other = Buffer.alloc(4096);
    await dev.read(4096, other);
    assert.ok(other.equals(block(2)));
    await store.close();
  });

  it('answers EIO for the blocks of a damaged datamap page, and serves the other pages', async () => {
    const { store, dev } = await damagedVolume(1);
    await assert.rejects(dev.read(0, Buffer.alloc(4096)), { code: 'EIO' });
    await assert.rejects(dev.read(0, Buffer.alloc(64 * 1024)), { code: 'EIO' });
    const other = Buffer.alloc(4096);
    await dev.read(35 * 4096, other); // block id 36, on page 1
    assert.ok(other.equals(block(36, 35)));
    await store.close();
  });

  it('keeps taking durable writes over the blocks of a damaged datamap page', async () => {
    const { dir, store, dev } = await damagedVolume(1);
    // Block 0's old copy (id 1) is on the damaged page: its count can no longer be dropped.
    await dev.write(0, block(99, 0));
    await dev.flush();
    await dev.write(40 * 4096, block(98, 40));
    await dev.flush();
    await store.close();
    const { store: reopened, dev: dev2 } = reopenVolume(dir);
    const got = Buffer.alloc(4096);
    await dev2.read(0, got);
    assert.ok(got.equals(block(99, 0)));
    await dev2.read(40 * 4096, got);
    assert.ok(got.equals(block(98, 40)));
    await assert.rejects(dev2.read(4096, got), { code: 'EIO' }); // id 2, still on the damaged page
    await reopened.close();
    assert.ok(fsckStore(dir).problems.length > 0, 'fsck still names the damaged page');
  });

  it('starts a damaged newest datamap page over when a new block is numbered into it', async () => {
    const { dir, store, dev } = await damagedVolume(33); // ids 32-63: the newest page
    await dev.write(50 * 4096, block(97, 50)); // id 41, on that page
    await dev.flush();
    await store.close();
    const { store: reopened, dev: dev2 } = reopenVolume(dir);
    const got = Buffer.alloc(4096);
    await dev2.read(50 * 4096, got);
    assert.ok(got.equals(block(97, 50)));
    await dev2.read(0, got); // id 1, on the sound page before it
    assert.ok(got.equals(block(1, 0)));
    await assert.rejects(dev2.read(35 * 4096, got), { code: 'EIO' }); // id 36: lost with the page
    await reopened.close();
  });

  it('does not compact away a record whose datamap entry disagrees with its header', async () => {
    const dir = path.join(tmp, `s${n++}`);
    let store = DedupStore.open(dir, silentLogger);
    let dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    await dev.write(0, Buffer.concat([block(1), block(2), block(3)]));
    await dev.trim(8192, 4096); // some garbage, so the segment is worth compacting
    await store.close();
    await flipEntryHashBit(dir);
    store = DedupStore.open(dir, silentLogger);
    dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    const compactor = new Compactor(store, silentLogger, { intervalMs: 0 });
    const [segment] = store.segments.list();
    await compactor.run(true);
    assert.ok(fs.existsSync(store.segments.path(segment!)), 'the segment holding the disputed record stays');
    const other = Buffer.alloc(4096);
    await dev.read(4096, other);
    assert.ok(other.equals(block(2)));
    await compactor.close();
    await store.close();
  });

  it('reads blocks whose remembered record places were compacted away', async () => {
    const dir = path.join(tmp, `s${n++}`);
    const store = DedupStore.open(dir, silentLogger);
    const compactor = new Compactor(store, silentLogger, { intervalMs: 0 });
    const a = new DedupDevice(store, store.volumeId('a'), 4096 * 192);
    const b = new DedupDevice(store, store.volumeId('b'), 4096 * 64);
    for (let i = 0; i < 64; i++) {
      for (let j = 0; j < 3; j++) await a.write((3 * i + j) * 4096, block(1, 1000 + 3 * i + j));
      await b.write(i * 4096, block(2, 2000 + i));
    }
    await store.flush();
    const expected = Buffer.concat(Array.from({ length: 64 }, (_, i) => block(2, 2000 + i)));
    const got = Buffer.alloc(4096 * 64);
    await b.read(0, got); // remembers where each record is
    assert.ok(got.equals(expected));
    store.segments.roll();
    await store.deleteVolume('a');
    await compactor.run(true);
    assert.ok(!fs.existsSync(store.segments.path(1)), 'the first segment was compacted away');
    const one = Buffer.alloc(4096);
    await b.read(5 * 4096, one);
    assert.ok(one.equals(block(2, 2005)), 'single block');
    got.fill(0);
    await b.read(0, got);
    assert.ok(got.equals(expected), 'whole volume');
    await compactor.close();
    await closeConsistent(store, dir);
  });

  it('keeps verify digests of chunks holding data only, and answers the rest all the same', async () => {
    const { dir, store } = freshVolume();
    const blocks = 16 * 1024; // 64 MiB: 16 chunks of 1024 blocks
    const dev = new DedupDevice(store, store.volumeId('big'), blocks * 4096);
    await dev.write(3 * 1024 * 4096, block(9));
    const all = store.chunkDigests(store.volumeId('big'), blocks);
    assert.equal(all.length, 16 * 32);
    const digestOf = (c: number): Buffer => all.subarray(c * 32, c * 32 + 32);
    assert.ok(digestOf(0).equals(digestOf(15)), 'empty chunks digest alike');
    assert.ok(!digestOf(3).equals(digestOf(0)), 'the chunk with data differs');
    const cached = (store as unknown as { digests: Map<number, unknown> }).digests;
    assert.equal(cached.size, 1);
    // A slice answers as the whole did.
    assert.ok(store.chunkDigests(store.volumeId('big'), blocks, 2, 3).equals(all.subarray(64, 160)));
    await closeConsistent(store, dir);
  });

  it('relocates a compacted window’s live records in one pool job, not one per record', async () => {
    const { dir, store, dev } = freshVolume();
    const compactor = new Compactor(store, silentLogger, { intervalMs: 0 });
    for (let i = 0; i < 128; i++) await dev.write(i * 4096, block(3, i));
    for (let i = 0; i < 128; i += 2) await dev.trim(i * 4096, 4096);
    await store.flush();
    // Pool jobs that write, counted where the batcher hands them over.
    const batcher = IoBatcher.prototype as unknown as { submit(this: BatcherState): void };
    const submit = batcher.submit;
    let writes = 0;
    batcher.submit = function (this: BatcherState): void {
      if (this.write && this.buffers.length > 0) writes++;
      submit.call(this);
    };
    try {
      const result = await compactor.run(true);
      assert.ok(result.movedBytes > 0, 'records moved');
    } finally {
      batcher.submit = submit;
    }
    assert.equal(writes, 1);
    const got = Buffer.alloc(4096);
    for (let i = 1; i < 128; i += 2) {
      await dev.read(i * 4096, got);
      assert.ok(got.equals(block(3, i)), `block ${i}`);
    }
    await compactor.close();
    await closeConsistent(store, dir);
  });
});

describe('fsck', () => {
  async function storeWithBlocks(): Promise<string> {
    const { dir, store, dev } = freshVolume('fsck');
    for (let i = 0; i < 4; i++) await dev.write(i * 4096, block(i + 1, i));
    await store.close();
    return dir;
  }

  it('finds a block with no references that nothing will ever delete', async () => {
    const dir = await storeWithBlocks();
    assert.deepEqual(fsckStore(dir).problems, []);
    // Block 1 unmapped and counted down as a checkpoint would, but never queued for deletion.
    const { env, meta, data, state } = openIndex(dir);
    await setMetaEntry(meta!, 1, 0, undefined);
    await editEntry(data!, 1, (entry) => entry.writeUInt32BE(0, 16)); // refcount
    const s = state.get('store') as {
      mappedBlocks: number;
      zeroRef?: number[];
      volumeBlocks: Record<string, number>;
    };
    await state.put('store', {
      ...s,
      mappedBlocks: s.mappedBlocks - 1,
      zeroRef: [],
      volumeBlocks: { 1: s.volumeBlocks[1]! - 1 },
    });
    await env.close();
    const problems = fsckStore(dir).problems;
    assert.equal(problems.length, 1, problems.join('\n'));
    assert.match(problems[0]!, /block 1: no references, and not queued for deletion/);
  });

  it('reports a volume whose counted data blocks disagree with its metamap', async () => {
    const dir = await storeWithBlocks();
    const { env, state } = openIndex(dir);
    const s = state.get('store') as { volumeBlocks: Record<string, number> };
    assert.deepEqual(s.volumeBlocks, { 1: 4 });
    await state.put('store', { ...s, volumeBlocks: { 1: 3 } });
    await env.close();
    assert.deepEqual(fsckStore(dir).problems, ['volume #1: 3 data blocks counted, 4 found']);
  });

  it('reports a datamap entry with an impossible length and goes on checking the rest', async () => {
    const dir = await storeWithBlocks();
    const { env, data } = openIndex(dir);
    await editEntry(data!, 1, (entry) => entry.writeUInt32BE(1 << 30, 8)); // storedLength
    await env.close();
    const report = fsckStore(dir);
    assert.match(report.problems[0]!, /block 1: datamap entry claims 1073741824 stored bytes/);
    // Only that block, and the live bytes of its segment that its record no longer counts in.
    assert.ok(
      report.problems.slice(1).every((p) => /^segment 1: /.test(p)),
      report.problems.join('\n'),
    );
    assert.equal(report.dataBlocks, 4);
  });

  it('reports a datamap page of the wrong length, and the references left without an entry', async () => {
    const dir = await storeWithBlocks();
    const { env, data } = openIndex(dir);
    const key = dataPageKeyInto(1, Buffer.alloc(8));
    await data!.put(key, Buffer.from(data!.get(key)!).subarray(0, 100));
    await env.close();
    const problems = fsckStore(dir).problems;
    assert.match(problems[0]!, /datamap page 0 holds 100 bytes/);
    assert.ok(problems.includes('block 1: 1 metamap references but no datamap entry'), problems.join('\n'));
  });

  it('checks a store whose datamap predates pages', async () => {
    const dir = await storeWithBlocks();
    await unpageDatamap(dir);
    const report = fsckStore(dir);
    assert.deepEqual(report.problems, []);
    assert.equal(report.dataBlocks, 4);
  });
});

describe('volume ids', () => {
  it('reuses the id of a deleted volume once all 8191 have been handed out, never a held one', async () => {
    const { store, dev } = freshVolume('ids');
    const a = store.volumeId('a');
    await dev.write(0, block(1, 1));
    const gone = store.volumeId('gone');
    await new DedupDevice(store, gone, 1 << 20).write(0, block(2, 2));
    await store.flush();
    await store.deleteVolume('gone');
    // As if 8190 more volumes, snapshots and clones had come and gone.
    (store as unknown as { state: { nextVolumeId: number } }).state.nextVolumeId = 2 ** 13;
    const fresh = store.volumeId('fresh');
    assert.equal(fresh, gone);
    assert.notEqual(fresh, a);
    const got = Buffer.alloc(4096);
    await new DedupDevice(store, fresh, 1 << 20).read(0, got);
    assert.ok(got.equals(Buffer.alloc(4096)), 'nothing of the deleted volume shows through');
    await new DedupDevice(store, a, 1 << 20).read(0, got);
    assert.ok(got.equals(block(1, 1)));
    await store.close();
  });
});

describe('metamap pages in a store', () => {
  it('converts a metamap kept an entry per block into pages when the store opens', async () => {
    const { dir, store, dev } = freshVolume('legacy');
    for (let i = 0; i < 40; i++) await dev.write(i * 4096, block(i + 1, i));
    await dev.write(40 * 4096, Buffer.alloc(4096)); // a zero block's entry too
    await store.close();
    assert.equal(await unpageMetamap(dir), 41);
    assert.deepEqual(fsckStore(dir).problems, [], 'fsck reads the old form');

    const again = DedupStore.open(dir, silentLogger);
    const { meta, legacyMeta } = openIndex(dir);
    assert.equal(legacyMeta!.getKeysCount(), 0);
    assert.equal(meta!.getKeysCount(), 3); // blocks 0-15, 16-31, 32-40
    const dev2 = new DedupDevice(again, again.volumeId('a'), 1 << 20);
    const got = Buffer.alloc(4096);
    for (let i = 0; i < 40; i++) {
      await dev2.read(i * 4096, got);
      assert.ok(got.equals(block(i + 1, i)), `block ${i}`);
    }
    assert.deepEqual(again.blockStates(again.volumeId('a'), 40, 1), ['zero']);
    await dev2.write(0, block(2, 1));
    await closeConsistent(again, dir);
  });

  it('writes a run of blocks as one page per 16 of them, and removes a page left without entries', async () => {
    const { dir, store, dev } = freshVolume('pages');
    await dev.write(8 * 4096, Buffer.concat(Array.from({ length: 64 }, (_, i) => block(i + 1, i))));
    await store.flush();
    const { meta } = openIndex(dir);
    // Blocks 8-71: pages at 0, 16, 32, 48 and 64.
    assert.equal(meta!.getKeysCount(), 5);
    await dev.trim(64 * 4096, 8 * 4096);
    await store.flush();
    assert.equal(meta!.getKeysCount(), 4);
    await closeConsistent(store, dir);
  });

  it('fails reads through a damaged metamap page, never reading its blocks as holes, and serves its neighbours', async () => {
    const { dir, store, dev } = freshVolume('damaged-read');
    for (let i = 0; i < 20; i++) await dev.write(i * 4096, block(i + 1, i));
    await dev.write(2000 * 4096, block(77, 77));
    await store.close();
    const { env, meta } = openIndex(dir);
    const key = Buffer.alloc(12);
    key.writeUInt32BE(1, 0);
    key.writeUInt32BE(16, 8); // blocks 16-31
    await meta!.put(key, Buffer.alloc(10));
    await env.close();
    const again = DedupStore.open(dir, silentLogger);
    const dev2 = new DedupDevice(again, again.volumeId('a'), 1 << 24);
    await assert.rejects(dev2.read(17 * 4096, Buffer.alloc(4096)), { code: 'EIO' });
    await assert.rejects(dev2.read(0, Buffer.alloc(64 * 4096)), { code: 'EIO' });
    // Only its 16 blocks: its neighbours in the same 1024-block cached page read and take writes.
    const got = Buffer.alloc(4096);
    for (const lba of [0, 15, 32, 2000]) {
      await dev2.read(lba * 4096, got);
      assert.ok(
        got.equals(lba === 2000 ? block(77, 77) : lba < 20 ? block(lba + 1, lba) : Buffer.alloc(4096)),
      );
    }
    await dev2.write(4096, block(99, 99));
    await dev2.read(4096, got);
    assert.ok(got.equals(block(99, 99)));
    await again.flush();
    await again.deleteVolume('a');
    await again.close();
  });

  it('names a metamap page whose value is damaged in fsck', async () => {
    const { dir, store, dev } = freshVolume('damaged');
    for (let i = 0; i < 4; i++) await dev.write(i * 4096, block(i + 1, i));
    await store.close();
    const { env, meta } = openIndex(dir);
    const key = Buffer.alloc(12);
    key.writeUInt32BE(1, 0);
    await meta!.put(key, Buffer.alloc(100, 0xff));
    await env.close();
    assert.match(fsckStore(dir).problems[0]!, /metamap page of volume #1 at block 0 holds 100 bytes/);
  });
});

describe('datamap pages in a store', () => {
  it('converts a datamap kept an entry per block into pages when the store opens', async () => {
    const { dir, store, dev } = freshVolume('legacy');
    for (let i = 0; i < 40; i++) await dev.write(i * 4096, block(i + 1, i));
    await store.close();
    assert.equal(await unpageDatamap(dir), 40);

    const again = DedupStore.open(dir, silentLogger);
    const { legacyData, data } = openIndex(dir);
    assert.equal(legacyData!.getKeysCount(), 0);
    assert.equal(data!.getKeysCount(), 2); // blocks 1-31 and 32-40
    const dev2 = new DedupDevice(again, again.volumeId('a'), 1 << 20);
    const got = Buffer.alloc(4096);
    for (let i = 0; i < 40; i++) {
      await dev2.read(i * 4096, got);
      assert.ok(got.equals(block(i + 1, i)), `block ${i}`);
    }
    // Writes after the conversion share the converted blocks and free the replaced ones.
    await dev2.write(0, block(2, 1));
    await closeConsistent(again, dir);
  });

  it('writes a run of new blocks as one page per 32 of them', async () => {
    const { dir, store, dev } = freshVolume('pages');
    const run = Buffer.concat(Array.from({ length: 64 }, (_, i) => block(i + 1, i)));
    await dev.write(0, run);
    await store.flush();
    const { data } = openIndex(dir);
    // Ids 1-64: pages 0 (1-31), 1 (32-63) and 2 (64).
    assert.equal(data!.getKeysCount(), 3);
    await closeConsistent(store, dir);
  });

  it('deletes a page once its last block is gone', async () => {
    const { dir, store, dev } = freshVolume('pages');
    await dev.write(0, Buffer.concat(Array.from({ length: 8 }, (_, i) => block(i + 1, i))));
    await store.flush();
    await dev.write(0, Buffer.alloc(8 * 4096));
    await store.flush();
    await store.flush();
    const { data } = openIndex(dir);
    assert.equal(data!.getKeysCount(), 0);
    await closeConsistent(store, dir);
  });
});

describe('index writer failures', () => {
  interface Writer {
    commit(r: unknown): Promise<unknown>;
  }
  /** The next commit lands, and its answer is lost (a writer that died before replying). */
  function loseNextAnswer(store: DedupStore): void {
    const writer = (store as unknown as { writer: Writer }).writer;
    const commit = writer.commit.bind(writer);
    writer.commit = async (r) => {
      writer.commit = commit;
      await commit(r);
      throw new Error('index writer exited with code 1');
    };
  }

  function read(dev: DedupDevice, lba: number): Promise<Buffer> {
    const got = Buffer.alloc(4096);
    return dev.read(lba * 4096, got).then(() => got);
  }

  it('keeps a checkpoint whose commit landed though the writer died before answering, counting it once', async () => {
    const { dir, store, dev } = freshVolume('lost');
    await dev.write(0, block(1));
    await dev.write(4096, block(1)); // two references to one block
    await dev.write(8192, block(2));
    await store.flush();
    await dev.write(0, block(3)); // block(1) down to one reference
    await dev.trim(8192, 4096); // block(2) down to none
    loseNextAnswer(store);
    await store.flush(); // applied twice, block(1) would reach zero with a reference left
    await store.flush(true);
    await store.flush(true);
    assert.ok((await read(dev, 0)).equals(block(3)));
    assert.ok((await read(dev, 1)).equals(block(1)));
    assert.equal((await store.stats()).uniqueBlocks, 2);
    await closeConsistent(store, dir);
  });

  it('takes no more changes once it cannot tell whether a commit whose answer was lost landed', async () => {
    const { dir, store, dev } = freshVolume('unknown');
    await dev.write(0, block(1));
    await store.flush();
    await dev.write(4096, block(2));
    const index = store as unknown as { stateDb: { get(key: string): unknown } };
    const get = index.stateDb.get.bind(index.stateDb);
    index.stateDb.get = () => {
      index.stateDb.get = get;
      throw new Error('injected index read failure');
    };
    loseNextAnswer(store);
    await assert.rejects(store.flush(), /cannot say whether it landed/);
    await assert.rejects(dev.write(8192, block(3)), /cannot say whether it landed/);
    await assert.rejects(store.flush(), /cannot say whether it landed/);
    assert.ok((await read(dev, 1)).equals(block(2)), 'what it holds is still served');
    await store.close();
    assert.deepEqual(fsckStore(dir).problems, []);
    // The commit had landed: the reopened store has it, once.
    const reopened = DedupStore.open(dir, silentLogger);
    const again = new DedupDevice(reopened, reopened.volumeId('a'), 1 << 20);
    assert.ok((await read(again, 1)).equals(block(2)));
    await closeConsistent(reopened, dir);
  });

  it('has the writer refuse a checkpoint numbered as one it already committed', async () => {
    const { dir, store, dev } = freshVolume('seq');
    await dev.write(0, block(1));
    await store.flush();
    const state = (store as unknown as { state: { commitSeq: number } }).state;
    state.commitSeq--; // as a store that missed its last commit landing would number the next
    await dev.write(4096, block(2));
    await assert.rejects(store.flush(), /checkpoint \d+ is out of order/);
    state.commitSeq++;
    await store.flush();
    assert.ok((await read(dev, 1)).equals(block(2)));
    await closeConsistent(store, dir);
  });

  it('unfiles the blocks a checkpoint deleted when the writer died before naming them', async () => {
    const store = fresh();
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    const filed = (): number => (store as unknown as { hashIndex: { size: number } }).hashIndex.size;
    await dev.write(0, block(1));
    await dev.write(4096, block(2));
    await store.flush();
    await dev.write(0, block(3)); // block(1) reaches zero references
    await store.flush();
    loseNextAnswer(store);
    await store.flush(true); // the checkpoint that deletes block(1)
    assert.equal((await store.stats()).uniqueBlocks, 2);
    assert.equal(filed(), 2);
    await store.close();
  });
});

describe('index memory map', () => {
  it('lets go of the index mapping after a checkpoint without losing a block', async () => {
    const { dir, store, dev } = freshVolume('map');
    for (let i = 0; i < 64; i++) await dev.write(i * 4096, block(i + 1, i));
    await store.flush(); // checkpoints, and drops the mapping's pages
    const indexFile = fs.realpathSync(path.join(dir, 'index', 'data.mdb'));
    // The map is still there to drop again: the pages went, not the mapping.
    assert.ok(native.dropFileMappings(indexFile) > 0);
    for (let i = 0; i < 64; i++) {
      const got = Buffer.alloc(4096);
      await dev.read(i * 4096, got);
      assert.ok(got.equals(block(i + 1, i)), `block ${i}`);
    }
    assert.equal(native.dropFileMappings(path.join(dir, 'not-mapped')), 0);
    await store.close();
  });
});

describe('dedup store under concurrency', () => {
  it('truncates every block of a volume, indexed or still in the overlays, past the checkpoint trigger', async () => {
    const dir = path.join(tmp, `trunc${n++}`);
    // Checkpoints every 64 changes: dropping 600 blocks calls for several (they start once
    // the truncation's synchronous pass is over, never inside it).
    const store = DedupStore.open(dir, silentLogger, { checkpointEntries: 64, metaCacheBytes: 0 });
    const volume = store.volumeId('t');
    const dev = new DedupDevice(store, volume, 1000 * 4096);
    await store.flush();
    for (let lba = 0; lba < 600; lba++) await dev.write(lba * 4096, block(1 + (lba % 200), lba));
    // Half of them in the index, half still in overlays when the truncation starts.
    await store.flush();
    for (let lba = 300; lba < 600; lba++) await dev.write(lba * 4096, block(250, lba));
    await store.truncateVolume(volume, 10);
    const got = Buffer.alloc(600 * 4096);
    await dev.read(0, got);
    for (let lba = 0; lba < 600; lba++) {
      const want = lba < 10 ? block(1 + (lba % 200), lba) : Buffer.alloc(4096);
      assert.ok(got.subarray(lba * 4096, (lba + 1) * 4096).equals(want), `block ${lba}`);
    }
    const s = await store.stats();
    assert.equal(s.mappedBlocks, 10);
    await closeConsistent(store, dir);
  });

  it('keeps contents and reference counts exact while writes race checkpoints', async () => {
    const dir = path.join(tmp, `race${n++}`);
    const store = DedupStore.open(dir, silentLogger);
    const dev = new DedupDevice(store, store.volumeId('a'), 64 * 4096);
    // Every round moves each content to the next block: a block's last reference goes
    // away as the same content is written elsewhere, the moment a checkpoint may be
    // deleting it. (fio's per-job buffer seeds produced this pattern in the bench.)
    const contents = Array.from({ length: 64 }, (_, i) => block(i + 1, i));
    const model: Buffer[] = [];
    const inflight = new Set<Promise<unknown>>();
    for (let round = 0; round < 120; round++) {
      for (let lba = 0; lba < 64; lba++) {
        const c = contents[(lba + round) % 64]!;
        model[lba] = c;
        const p = dev.write(lba * 4096, c).finally(() => inflight.delete(p));
        inflight.add(p);
        if (inflight.size >= 32) await Promise.race(inflight);
      }
      if (round % 3 === 0) void store.flush();
    }
    await Promise.all(inflight);
    const got = Buffer.alloc(64 * 4096);
    await dev.read(0, got);
    assert.ok(got.equals(Buffer.concat(model)));
    await store.close();
    const report = fsckStore(dir);
    assert.deepEqual(report.problems, []);
  });
});

describe('space reclamation', () => {
  function unique(i: number): Buffer {
    const b = Buffer.alloc(4096);
    for (let j = 0; j < 4096; j += 4) b.writeUInt32BE((i * 2654435761 + j * 40503) >>> 0, j);
    return b;
  }

  it('frees at least 90% of a deleted volume’s space after compaction, keeping the rest intact', async () => {
    const dir = path.join(tmp, `compact${n++}`);
    const store = DedupStore.open(dir, silentLogger);
    const compactor = new Compactor(store, silentLogger, { intervalMs: 0 });
    const a = new DedupDevice(store, store.volumeId('a'), 4096 * 2048);
    const b = new DedupDevice(store, store.volumeId('b'), 4096 * 256);
    // Interleaved, so the survivors share segments with the dead.
    for (let i = 0; i < 2048; i++) {
      await a.write(i * 4096, unique(i));
      if (i % 8 === 0) await b.write((i / 8) * 4096, unique(100_000 + i));
    }
    await store.flush();
    const before = await store.stats();
    const bBytes = 256 * (before.storedBytes / before.uniqueBlocks);
    const aBytes = before.storedBytes - bBytes;
    await store.deleteVolume('a');
    const result = await compactor.run(true);
    const after = await store.stats();
    assert.ok(result.freedBytes >= 0.9 * aBytes, `freed ${result.freedBytes} of ${aBytes}`);
    assert.ok(after.segmentBytes <= before.segmentBytes - 0.9 * aBytes);
    for (let i = 0; i < 2048; i += 8) {
      const got = Buffer.alloc(4096);
      await b.read((i / 8) * 4096, got);
      assert.ok(got.equals(unique(100_000 + i)), `b block ${i / 8}`);
    }
    await compactor.close();
    await closeConsistent(store, dir);
  });

  it('moves the records that follow bytes no record owns (a failed write), and frees their segment', async () => {
    const { dir, store, dev } = freshVolume('gap');
    for (let i = 0; i < 3; i++) await dev.write(i * 4096, unique(i));
    await dev.write(0, unique(9)); // the first record of the segment is dead
    await store.close();
    // Its header never reached the disk, as a write that failed leaves it.
    const seg = path.join(dir, 'segments', segmentFileName(store.segments.list()[0]!));
    const fd = fs.openSync(seg, 'r+');
    fs.writeSync(fd, Buffer.alloc(RECORD_HEADER), 0, RECORD_HEADER, 0);
    fs.closeSync(fd);
    const reopened = DedupStore.open(dir, silentLogger);
    const compactor = new Compactor(reopened, silentLogger, { intervalMs: 0 });
    await compactor.run(true);
    assert.ok(!fs.existsSync(seg), 'the segment is deleted');
    const again = new DedupDevice(reopened, reopened.volumeId('a'), 1 << 20);
    for (const [lba, want] of [
      [0, 9],
      [1, 1],
      [2, 2],
    ] as const) {
      const got = Buffer.alloc(4096);
      await again.read(lba * 4096, got);
      assert.ok(got.equals(unique(want)), `block ${lba}`);
    }
    await compactor.close();
    await closeConsistent(reopened, dir);
  });

  it('does not reopen a segment while it is being unlinked', async () => {
    const { dir, store, dev } = freshVolume('unlink');
    await dev.write(0, unique(1));
    await store.flush();
    const segments = store.segments;
    const n = segments.currentSegment;
    segments.roll();
    const removing = segments.remove(n);
    // A read in the window (a stale place hint) must fail as it would once the file is gone.
    await assert.rejects(segments.read(n, 0, RECORD_HEADER), /ENOENT/);
    await removing;
    assert.equal((segments as unknown as { open: Map<number, unknown> }).open.has(n), false);
    await store.close();
    assert.ok(!fs.existsSync(path.join(dir, 'segments', segmentFileName(n))));
  });

  it('removes an empty sealed segment at the first commit past its grace, and writes the next one over its file', async () => {
    const dir = path.join(tmp, `retire${n++}`);
    const store = DedupStore.open(dir, silentLogger, { emptySegmentGraceMs: 50 });
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    for (let i = 0; i < 64; i++) await dev.write(i * 4096, unique(i));
    await store.flush();
    const first = store.segments.currentSegment;
    const firstSize = store.segments.size(first);
    store.segments.roll();
    // Every block of the first segment loses its last reference: no compaction pass runs.
    for (let i = 0; i < 64; i++) await dev.write(i * 4096, unique(1000 + i));
    await store.flush();
    const firstFile = path.join(dir, 'segments', segmentFileName(first));
    // Still readable for a while: a mirror may yet read a block it captured from it.
    assert.ok(fs.existsSync(firstFile));
    await new Promise((resolve) => setTimeout(resolve, 80));
    await store.flush(true);
    assert.equal(fs.existsSync(firstFile), false);
    assert.equal(store.segments.spareBytes(), firstSize);
    store.segments.roll();
    await dev.write(0, unique(5000));
    assert.equal(store.segments.spareBytes(), 0);
    await store.flush();
    const back = Buffer.alloc(4096);
    await dev.read(0, back);
    assert.ok(back.equals(unique(5000)));
    for (let i = 1; i < 64; i++) {
      await dev.read(i * 4096, back);
      assert.ok(back.equals(unique(1000 + i)), `block ${i}`);
    }
    await closeConsistent(store, dir);
  });

  it('leaves a segment still losing live data fast to a later background pass', async () => {
    const dir = path.join(tmp, `dying${n++}`);
    const store = DedupStore.open(dir, silentLogger);
    const compactor = new Compactor(store, silentLogger, { intervalMs: 0 });
    const dev = new DedupDevice(store, store.volumeId('a'), 8 << 20);
    for (let i = 0; i < 1024; i++) await dev.write(i * 4096, unique(3000 + i));
    await store.flush();
    const sealed = store.segments.currentSegment;
    store.segments.roll();
    await dev.trim(0, 400 * 4096); // 61% live: no candidate yet
    assert.equal((await compactor.run(false)).segments, 0);
    await dev.trim(400 * 4096, 200 * 4096); // 41% live, a fifth of it gone since the last pass
    const second = await compactor.run(false);
    assert.equal(second.segments, 0, 'compacted while still being overwritten');
    assert.ok(store.segments.sealed().includes(sealed));
    const third = await compactor.run(false); // nothing died since: its turn
    assert.equal(third.segments, 1);
    assert.ok(third.movedBytes > 0);
    const back = Buffer.alloc(4096);
    await dev.read(700 * 4096, back);
    assert.ok(back.equals(unique(3700)));
    await compactor.close();
    await closeConsistent(store, dir);
  });

  it('stops a compaction pass at its next window when the compactor closes, and loses nothing', async () => {
    const dir = path.join(tmp, `stop${n++}`);
    const store = DedupStore.open(dir, silentLogger);
    // 1 MiB/s: walking the 8 MiB segment would take ~8 s.
    const compactor = new Compactor(store, silentLogger, { intervalMs: 0, bytesPerSecond: 1 << 20 });
    const dev = new DedupDevice(store, store.volumeId('a'), 16 << 20);
    for (let i = 0; i < 2048; i++) await dev.write(i * 4096, unique(5000 + i));
    await store.flush();
    store.segments.roll();
    await dev.trim(0, 1024 * 4096);
    const pass = compactor.run(true);
    await new Promise((resolve) => setTimeout(resolve, 300));
    const t0 = Date.now();
    await compactor.close();
    assert.ok(Date.now() - t0 < 2000, `close took ${Date.now() - t0} ms`);
    assert.ok((await pass).movedBytes < 4 << 20, 'the pass ran on after close');
    const back = Buffer.alloc(4096);
    for (const i of [1024, 1500, 2047]) {
      await dev.read(i * 4096, back);
      assert.ok(back.equals(unique(5000 + i)), `block ${i}`);
    }
    await closeConsistent(store, dir);
  });

  it('walks rather than removes a segment sealed while its pass flushed, though no commit counts its records yet', async () => {
    const dir = path.join(tmp, `retire${n++}`);
    const store = DedupStore.open(dir, silentLogger);
    const compactor = new Compactor(store, silentLogger, { intervalMs: 0 });
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    // Writes that land during the pass's own flush, in a segment sealed before it looks.
    const collect = store.collect.bind(store);
    store.collect = async () => {
      await collect();
      store.collect = collect;
      for (let i = 0; i < 16; i++) await dev.write(i * 4096, unique(2000 + i));
      store.segments.roll();
    };
    await compactor.run(false);
    const back = Buffer.alloc(4096);
    for (let i = 0; i < 16; i++) {
      await dev.read(i * 4096, back);
      assert.ok(back.equals(unique(2000 + i)), `block ${i}`);
    }
    await compactor.close();
    await closeConsistent(store, dir);
  });

  /**
   * A store with one sealed segment of `blocks` blocks, all trimmed: empty, but with a
   * grace longer than any test, so only the compactor removes it.
   */
  async function emptiedSegment(
    blocks: number,
  ): Promise<{ dir: string; store: DedupStore; compactor: Compactor; size: number }> {
    const dir = path.join(tmp, `retire${n++}`);
    const store = DedupStore.open(dir, silentLogger, { emptySegmentGraceMs: 60_000 });
    const compactor = new Compactor(store, silentLogger, { intervalMs: 0 });
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    for (let i = 0; i < blocks; i++) await dev.write(i * 4096, unique(i));
    await store.flush();
    const size = store.segments.size(store.segments.currentSegment);
    store.segments.roll();
    await dev.trim(0, blocks * 4096);
    return { dir, store, compactor, size };
  }

  it('counts an emptied segment kept as a spare as freed only when the spare is deleted', async () => {
    const { dir, store, compactor, size } = await emptiedSegment(32);
    const first = await compactor.run(false);
    assert.equal(first.segments, 1);
    assert.equal(first.freedBytes, 0);
    assert.equal(store.segments.spareBytes(), size);
    // A pass that saw no new segment deletes the spare, and counts it then.
    const second = await compactor.run(false);
    assert.equal(second.freedBytes, size);
    assert.equal(store.segments.spareBytes(), 0);
    await compactor.close();
    await closeConsistent(store, dir);
  });

  it('has fsck report spare segment files apart from the segments', async () => {
    const { dir, store, compactor, size } = await emptiedSegment(8);
    await compactor.run(false);
    await compactor.close();
    await store.close();
    const report = fsckStore(dir);
    assert.deepEqual(report.problems, []);
    assert.equal(report.spareBytes, size);
    assert.equal(report.segmentBytes, 0);
  });

  it('keeps a sealed segment that still holds a live block', async () => {
    const dir = path.join(tmp, `retire${n++}`);
    const store = DedupStore.open(dir, silentLogger, { emptySegmentGraceMs: 0 });
    const dev = new DedupDevice(store, store.volumeId('a'), 1 << 20);
    for (let i = 0; i < 8; i++) await dev.write(i * 4096, unique(i));
    await store.flush();
    const first = store.segments.currentSegment;
    store.segments.roll();
    for (let i = 1; i < 8; i++) await dev.write(i * 4096, unique(1000 + i));
    await store.flush();
    await store.flush(true);
    assert.ok(fs.existsSync(path.join(dir, 'segments', segmentFileName(first))));
    const back = Buffer.alloc(4096);
    await dev.read(0, back);
    assert.ok(back.equals(unique(0)));
    await closeConsistent(store, dir);
  });

  it('frees the space of a volume trimmed whole', async () => {
    const dir = path.join(tmp, `compact${n++}`);
    const store = DedupStore.open(dir, silentLogger);
    const compactor = new Compactor(store, silentLogger, { intervalMs: 0 });
    const a = new DedupDevice(store, store.volumeId('a'), 4096 * 1024);
    for (let i = 0; i < 1024; i++) await a.write(i * 4096, unique(i));
    await store.flush();
    const used = (await store.stats()).segmentBytes;
    await a.trim(0, 4096 * 1024);
    await compactor.run(true);
    assert.ok(
      (await store.stats()).segmentBytes <= 0.1 * used,
      `${(await store.stats()).segmentBytes} of ${used} left`,
    );
    await compactor.close();
    await closeConsistent(store, dir);
  });
});

// A mirror's activity log forgets a chunk only once its last change is older than
// durableAsOf (mirror.ts, settleLog): after a crash the store reopens at its last
// commit, and a chunk forgotten too early would not be resent to its replicas.
describe('durableAsOf, the point the store is durable up to', () => {
  it('moves past a write only once a checkpoint holding it commits, not when the commit fails', async () => {
    const { dir, store, dev } = freshVolume('d');
    const opened = store.durableAsOf;
    await dev.write(0, block(0x31));
    const written = performance.now();
    assert.ok(store.durableAsOf < written, 'nothing committed since the write');

    const writer = (store as unknown as { writer: { commit(r: unknown): Promise<unknown> } }).writer;
    const commit = writer.commit.bind(writer);
    writer.commit = () => Promise.reject(new Error('injected commit refusal'));
    await assert.rejects(store.flush(), /injected commit refusal/);
    assert.equal(store.durableAsOf, opened, 'a refused commit makes nothing durable');

    writer.commit = commit;
    await store.flush();
    assert.ok(store.durableAsOf >= written, 'the committed checkpoint froze after the write');
    await closeConsistent(store, dir);
  });
});
