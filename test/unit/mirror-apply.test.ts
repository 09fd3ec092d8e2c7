import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { BlockHasher } from '../../gateway/store/block-codec';
import { DedupDevice } from '../../gateway/store/dedup-device';
import { clusterSecret, DedupStore, MirroredBlock } from '../../gateway/store/dedup-store';
import { KIND_DATA } from '../../protocol/replication/block-kinds';
import { fsckStore } from '../../gateway/store/fsck';
import { silentLogger } from '../../gateway/util/log';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-mirror-apply-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));
const seed = crypto.randomBytes(32);
const hasher = new BlockHasher(clusterSecret(seed));
let n = 0;

/** A fresh store sharing this file's content secret, hashing inline, and its directory. */
function openStore(): { dir: string; store: DedupStore } {
  const dir = path.join(tmp, `s${n++}`);
  return { dir, store: DedupStore.open(dir, silentLogger, { secretSeed: seed, hashPoolMin: null }) };
}

function blocks(count: number): Buffer[] {
  return Array.from({ length: count }, () => crypto.randomBytes(4096));
}

/** A batch of data blocks at lba 0.., as a primary would send it, with every block provided raw. */
function batch(data: Buffer[]): {
  ranges: Array<{ lba: number; kinds: Buffer; cids: Buffer }>;
  provided: Map<number, MirroredBlock>;
} {
  const ranges = [
    {
      lba: 0,
      kinds: Buffer.alloc(data.length, KIND_DATA),
      cids: Buffer.concat(data.map((b) => hasher.hash(b))),
    },
  ];
  const provided = new Map(data.map((b, i) => [i, { payload: b, lz4: false }]));
  return { ranges, provided };
}

/**
 * Applies `ranges` to a new volume with only ordinals 0 and 1 bringing bytes (a and b), as a
 * primary sends a batch that repeats them; returns the volume once the batch is written.
 */
async function appliedWithFirstTwo(
  store: DedupStore,
  ranges: Array<{ lba: number; kinds: Buffer; cids: Buffer }>,
  a: Buffer,
  b: Buffer,
): Promise<number> {
  const provided = new Map([
    [0, { payload: a, lz4: false }],
    [1, { payload: b, lz4: false }],
  ]);
  const vol = store.volumeId('m');
  const r = store.applyMirrored(vol, ranges, provided);
  assert.ok('written' in r);
  await r.written;
  return vol;
}

/** Holds the store's next segment append's acknowledgement (its bytes are written) until `now` fails it. */
function failNextAppend(store: DedupStore): { now: (err: Error) => void } {
  const segments = store.segments;
  const append = segments.append.bind(segments);
  const control = { now: (_err: Error): void => undefined };
  segments.append = (record: Buffer) => {
    segments.append = append;
    const real = append(record);
    const written = real.written.then(
      () =>
        new Promise<void>((_resolve, reject) => {
          control.now = reject;
        }),
    );
    written.catch(() => undefined);
    return { ...real, written };
  };
  return control;
}

describe('applying mirrored batches', () => {
  it('keeps a batch whose new blocks cross the checkpoint trigger in one overlay', async () => {
    const dir = path.join(tmp, `s${n++}`);
    // A checkpoint is due after 50 changes: a 64-block batch makes ~190.
    const store = DedupStore.open(dir, silentLogger, { secretSeed: seed, checkpointEntries: 50 });
    const vol = store.volumeId('m');
    const data = blocks(64);
    const { ranges, provided } = batch(data);
    const r = store.applyMirrored(vol, ranges, provided);
    assert.ok('written' in r);
    await r.written;
    await store.flush();
    const dev = new DedupDevice(store, vol, 64 * 4096);
    const got = Buffer.alloc(64 * 4096);
    await dev.read(0, got);
    assert.ok(got.equals(Buffer.concat(data)));
    await store.close();
    assert.deepEqual(fsckStore(dir).problems, []);
  });

  it('names the blocks it lacks, and links the ones it holds under any volume', async () => {
    const dir = path.join(tmp, `s${n++}`);
    const store = DedupStore.open(dir, silentLogger, { secretSeed: seed });
    const data = blocks(4);
    const local = new DedupDevice(store, store.volumeId('local'), 4 * 4096);
    await local.write(0, Buffer.concat([data[1]!, data[3]!]));
    const { ranges } = batch(data);
    assert.deepEqual(store.missingContent(ranges), [0, 2]);
    const vol = store.volumeId('m');
    assert.deepEqual(store.applyMirrored(vol, ranges, new Map()), { missing: [0, 2] });
    const some = new Map([0, 2].map((i) => [i, { payload: data[i]!, lz4: false }]));
    const r = store.applyMirrored(vol, ranges, some);
    assert.ok('written' in r);
    await r.written;
    const got = Buffer.alloc(4 * 4096);
    await new DedupDevice(store, vol, 4 * 4096).read(0, got);
    assert.ok(got.equals(Buffer.concat(data)));
    assert.equal((await store.stats()).uniqueBlocks, 4);
    await store.close();
  });

  it('stores a block a batch carries at several ordinals once, and maps every ordinal to it', async () => {
    const { dir, store } = openStore();
    const [a, b] = blocks(2);
    const data = [a!, b!, a!, a!, b!];
    const { ranges } = batch(data);
    const vol = await appliedWithFirstTwo(store, ranges, a!, b!);
    const got = Buffer.alloc(data.length * 4096);
    await new DedupDevice(store, vol, data.length * 4096).read(0, got);
    assert.ok(got.equals(Buffer.concat(data)));
    assert.equal((await store.stats()).uniqueBlocks, 2);
    await store.close();
    assert.deepEqual(fsckStore(dir).problems, []);
  });

  it('keeps apart two contents whose content ids share their first six bytes', async () => {
    const { store } = openStore();
    // Keyed hashes cannot be made to collide here: the check of bytes against ids is
    // switched off, and the ids are made up, equal but for their last byte.
    (store as unknown as { hasher: BlockHasher }).hasher.matches = () => true;
    const [a, b] = blocks(2);
    const x = Buffer.alloc(16, 7);
    const y = Buffer.from(x);
    y[15] = 8;
    const ranges = [{ lba: 0, kinds: Buffer.alloc(5, KIND_DATA), cids: Buffer.concat([x, y, y, x, y]) }];
    const vol = await appliedWithFirstTwo(store, ranges, a!, b!);
    // Two blocks: one mapped by x's two ordinals, one by y's three.
    const counts = [...(await store.volumeContents(vol)).values()].sort();
    assert.deepEqual(counts, [2, 3]);
    assert.equal((await store.stats()).uniqueBlocks, 2);
    await store.close();
  });

  it("forgets a batch's records in flight once their write settles, when applying it failed midway", async () => {
    const { store } = openStore();
    const internals = store as unknown as {
      mirrorPlaced: Map<number, object>;
      pending: { has(id: number): boolean };
      state: { nextBlockId: number };
    };
    // The first block's bookkeeping throws after the segment append has started.
    const placed = internals.mirrorPlaced;
    const set = placed.set.bind(placed);
    placed.set = () => {
      placed.set = set;
      throw new Error('injected');
    };
    const { ranges, provided } = batch(blocks(2));
    const first = internals.state.nextBlockId;
    assert.throws(() => store.applyMirrored(store.volumeId('m'), ranges, provided), /injected/);
    assert.equal(internals.pending.has(first), true);
    // Left registered, it would send every later write of its content down the slow path
    // (wait, then store a copy of its own).
    for (let i = 0; i < 100 && internals.pending.has(first); i++) await new Promise((r) => setTimeout(r, 20));
    assert.equal(internals.pending.has(first), false);
    await store.close();
  });

  /** applyMirrored of `data` with these payloads throws `error`, and the volume stays unwritten. */
  async function refusedChangingNothing(
    data: Buffer[],
    provided: Map<number, MirroredBlock>,
    error: RegExp,
  ): Promise<void> {
    const { store } = openStore();
    const vol = store.volumeId('m');
    assert.throws(() => store.applyMirrored(vol, batch(data).ranges, provided), error);
    const got = Buffer.alloc(data.length * 4096, 1);
    await new DedupDevice(store, vol, data.length * 4096).read(0, got);
    assert.ok(got.every((b) => b === 0));
    await store.close();
  }

  it('refuses a block whose bytes do not match its content id, changing nothing', async () => {
    const data = blocks(2);
    const wrong = new Map([
      [0, { payload: data[0]!, lz4: false }],
      [1, { payload: data[0]!, lz4: false }],
    ]);
    await refusedChangingNothing(data, wrong, /does not match its content id/);
  });

  it('refuses an lz4 payload that does not decode to a block, changing nothing', async () => {
    // A literal-only lz4 sequence of 16 bytes: well formed, but not 4 KiB.
    const short = Buffer.concat([Buffer.of(0xf0, 1), Buffer.alloc(16, 7)]);
    const bad = new Map([[0, { payload: short, lz4: true }]]);
    await refusedChangingNothing(blocks(1), bad, /mirrored block 0: lz4 payload does not decode/);
  });

  it('takes its own copy of a block a client write still has in flight, and keeps it when that write fails', async () => {
    const { dir, store } = openStore();
    const client = new DedupDevice(store, store.volumeId('a'), 16 * 4096);
    const vol = store.volumeId('m');
    const [x] = blocks(1);
    // The client's write of x is on its way to the segment, and will fail.
    const fail = failNextAppend(store);
    const write = client.write(0, x!);
    write.catch(() => undefined);
    await new Promise((r) => setImmediate(r));
    const { ranges } = batch([x!]);
    const first = store.applyMirrored(vol, ranges, new Map());
    assert.deepEqual(
      first,
      { missing: [0] },
      'asked for the bytes rather than linking to the write in flight',
    );
    const { provided } = batch([x!]);
    const r = store.applyMirrored(vol, ranges, provided);
    assert.ok('written' in r);
    await r.written;
    fail.now(new Error('injected segment write failure'));
    await assert.rejects(write, /injected/);
    await store.flush();
    const got = Buffer.alloc(4096);
    await new DedupDevice(store, vol, 16 * 4096).read(0, got);
    assert.ok(got.equals(x!));
    await store.close();
    assert.deepEqual(fsckStore(dir).problems, []);
  });

  it("takes its own copy of a block another volume's batch still has in flight", async () => {
    const { dir, store } = openStore();
    const [x] = blocks(1);
    // v1's batch places x; its segment write is held, and will fail.
    const fail = failNextAppend(store);
    const v1 = store.volumeId('v1');
    const v2 = store.volumeId('v2');
    const one = batch([x!]);
    const r1 = store.applyMirrored(v1, one.ranges, one.provided);
    assert.ok('written' in r1);
    r1.written.catch(() => undefined);
    assert.deepEqual(store.applyMirrored(v2, one.ranges, new Map()), { missing: [0] });
    const r2 = store.applyMirrored(v2, one.ranges, batch([x!]).provided);
    assert.ok('written' in r2);
    await r2.written;
    fail.now(new Error('injected segment write failure'));
    await assert.rejects(r1.written, /injected/);
    await store.flush();
    const got = Buffer.alloc(4096);
    await new DedupDevice(store, v2, 4096).read(0, got);
    assert.ok(got.equals(x!));
    await store.close();
    assert.deepEqual(fsckStore(dir).problems, []);
  });

  it('links a block in flight only for the link that placed it, not for a newer link of the same volume', async () => {
    const { dir, store } = openStore();
    const [x] = blocks(1);
    const fail = failNextAppend(store);
    const vol = store.volumeId('m');
    const oldLink = {};
    const newLink = {};
    const one = batch([x!]);
    const placed = store.applyMirrored(vol, one.ranges, one.provided, oldLink);
    assert.ok('written' in placed);
    placed.written.catch(() => undefined);
    assert.deepEqual(store.missingContent(one.ranges, oldLink), [], 'the placing link may link to it');
    assert.deepEqual(store.missingContent(one.ranges, newLink), [0], 'a newer link asks for the bytes');
    assert.deepEqual(store.applyMirrored(vol, one.ranges, new Map(), newLink), { missing: [0] });
    const r = store.applyMirrored(vol, one.ranges, batch([x!]).provided, newLink);
    assert.ok('written' in r);
    await r.written;
    fail.now(new Error('injected segment write failure'));
    await assert.rejects(placed.written, /injected/);
    await store.flush();
    const got = Buffer.alloc(4096);
    await new DedupDevice(store, vol, 16 * 4096).read(0, got);
    assert.ok(got.equals(x!), "the newer link's copy stands");
    await store.close();
    assert.deepEqual(fsckStore(dir).problems, []);
  });

  it("holes a later batch's link to a block whose write then fails, as well as the placing batch's", async () => {
    const { dir, store } = openStore();
    const [x] = blocks(1);
    const fail = failNextAppend(store);
    const vol = store.volumeId('m');
    const link = {};
    const at = (lba: number) => [{ lba, kinds: Buffer.from([KIND_DATA]), cids: hasher.hash(x!) }];
    const placing = store.applyMirrored(vol, at(0), batch([x!]).provided, link);
    assert.ok('written' in placing);
    const linking = store.applyMirrored(vol, at(1), new Map(), link);
    assert.ok('written' in linking, 'the same link links to its own block in flight');
    await linking.written;
    await new Promise((r) => setTimeout(r, 20)); // the placing write's bytes land, its answer waits
    fail.now(new Error('injected segment write failure'));
    await assert.rejects(placing.written, /injected/);
    await store.flush(); // a checkpoint before the primary sends the ranges again
    const got = Buffer.alloc(2 * 4096);
    await new DedupDevice(store, vol, 16 * 4096).read(0, got);
    assert.ok(got.equals(Buffer.alloc(2 * 4096)), 'both blocks are holes until the primary resends');
    await store.close();
    assert.deepEqual(fsckStore(dir).problems, []);
  });

  it('keeps the hash filed under the first copy when another link takes its own beside it', async () => {
    const { dir, store } = openStore();
    const [x] = blocks(1);
    const held = failNextAppend(store);
    const first = {};
    const second = {};
    const one = batch([x!]);
    const placed = store.applyMirrored(store.volumeId('v1'), one.ranges, one.provided, first);
    assert.ok('written' in placed);
    const copy = store.applyMirrored(store.volumeId('v2'), one.ranges, batch([x!]).provided, second);
    assert.ok('written' in copy);
    // The first link's next batch still finds its own block, and needs no bytes.
    assert.deepEqual(store.missingContent(one.ranges, first), []);
    await copy.written;
    held.now(new Error('injected segment write failure'));
    await assert.rejects(placed.written, /injected/);
    await store.flush();
    await store.close();
    assert.deepEqual(fsckStore(dir).problems, []);
  });
});
