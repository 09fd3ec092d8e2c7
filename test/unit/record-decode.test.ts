import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, it } from 'node:test';
import {
  BlockHasher,
  CorruptBlockError,
  decodeRecordAt,
  encodeRecord,
} from '../../gateway/store/block-codec';
import { RECORD_HEADER } from '../../gateway/store/layout';
import { native } from '../../native-bindings';

const hasher = new BlockHasher(crypto.randomBytes(192));

function sample(compressible: boolean): { block: Buffer; hash: Buffer; rec: Buffer } {
  const block = compressible ? Buffer.alloc(4096, 'abcd') : crypto.randomBytes(4096);
  const hash = hasher.hash(block);
  return { block, hash, rec: encodeRecord(7, block, hash) };
}

/** The record at offset 100 of a larger buffer, decoded to offset 4096 of a two-block output. */
function decodeEmbedded(rec: Buffer, id: number, hash: Buffer): Buffer {
  const buf = Buffer.concat([Buffer.alloc(100, 0xee), rec, Buffer.alloc(50, 0xee)]);
  const out = Buffer.alloc(8192, 0x11);
  decodeRecordAt(buf, 100, id, hash, 0, hasher, out, 4096);
  assert.ok(
    out.subarray(0, 4096).every((b) => b === 0x11),
    'nothing written before outAt',
  );
  return out.subarray(4096);
}

describe('segment record decoding', () => {
  it('decodes lz4 and raw records at any offset into any place of the output', () => {
    for (const compressible of [true, false]) {
      const { block, hash, rec } = sample(compressible);
      assert.ok(decodeEmbedded(rec, 7, hash).equals(block));
    }
  });

  it('checks the contents against a hash held anywhere, such as the record header', () => {
    const { block, rec } = sample(true);
    const out = Buffer.alloc(4096);
    decodeRecordAt(rec, 0, 7, rec, 24, hasher, out, 0);
    assert.ok(out.equals(block));
  });

  it('refuses a record without a header', () => {
    const { hash, rec } = sample(true);
    rec[0] = 0;
    assert.throws(() => decodeEmbedded(rec, 7, hash), /block 7: no record header/);
  });

  it("refuses another block's record, naming it", () => {
    const { hash, rec } = sample(true);
    assert.throws(() => decodeEmbedded(rec, 8, hash), /block 8: found the record of block 7/);
  });

  it('refuses a payload longer than the bytes read', () => {
    const { hash, rec } = sample(true);
    rec.writeUInt32BE(1 << 20, 16);
    assert.throws(() => decodeEmbedded(rec, 7, hash), /does not decode to a block/);
  });

  it('refuses contents that fail the hash check', () => {
    const { hash, rec } = sample(false);
    rec[2000] = rec[2000]! ^ 0x40;
    assert.throws(() => decodeEmbedded(rec, 7, hash), CorruptBlockError);
    assert.throws(() => decodeEmbedded(rec, 7, hash), /contents fail the hash check/);
  });

  it('rejects offsets outside the buffers with a RangeError', () => {
    const { hash, rec } = sample(true);
    assert.throws(
      () => decodeRecordAt(rec, rec.length + 1, 7, hash, 0, hasher, Buffer.alloc(4096), 0),
      RangeError,
    );
    assert.throws(() => decodeRecordAt(rec, 0, 7, hash, 0, hasher, Buffer.alloc(4096), 1), RangeError);
    assert.throws(() => decodeRecordAt(rec, 0, 7, hash, 1, hasher, Buffer.alloc(4096), 0), RangeError);
  });
});

describe('batch record decoding on the libuv pool', () => {
  /** Records of blocks 1..n laid end to end, with their blocks and hashes. */
  function run(n: number): { rec: Buffer; at: number[]; blocks: Buffer[]; hashes: Buffer } {
    const blocks: Buffer[] = [];
    const recs: Buffer[] = [];
    const at: number[] = [];
    const hashes = Buffer.alloc(16 * n);
    let used = 0;
    for (let k = 0; k < n; k++) {
      const block = k % 2 ? crypto.randomBytes(4096) : Buffer.alloc(4096, `block ${k} `);
      const hash = hasher.hash(block);
      hash.copy(hashes, 16 * k);
      const r = encodeRecord(k + 1, block, hash);
      blocks.push(block);
      recs.push(r);
      at.push(used);
      used += r.length;
    }
    return { rec: Buffer.concat(recs), at, blocks, hashes };
  }

  function items(at: number[], ids: number[], hashAt: (k: number) => number): Float64Array {
    const out = new Float64Array(4 * at.length);
    at.forEach((a, k) => out.set([a, ids[k]!, 4096 * (at.length - 1 - k), hashAt(k)], 4 * k));
    return out;
  }

  it('decodes every record into its place, against given hashes or the headers', async () => {
    const { rec, at, blocks, hashes } = run(70);
    const out = Buffer.alloc(4096 * 70);
    const status = new Int32Array(70).fill(-9);
    const ids = at.map((_a, k) => k + 1);
    await hasher.decodeMany(
      rec,
      items(at, ids, (k) => (k % 3 ? 16 * k : -1)),
      hashes,
      out,
      status,
    );
    assert.deepEqual([...status], new Array(70).fill(0));
    for (let k = 0; k < 70; k++) assert.ok(out.subarray(4096 * (69 - k), 4096 * (70 - k)).equals(blocks[k]!));
  });

  it('reports each bad record by itself: wrong block, damaged payload, hash mismatch', async () => {
    const { rec, at, hashes } = run(8);
    const ids = at.map((_a, k) => k + 1);
    ids[1] = 99; // asks for another block's record
    rec[at[2]! + RECORD_HEADER + 10]! ^= 0xff; // payload byte flipped (lz4 or contents)
    hashes[16 * 5]! ^= 1; // the datamap's hash disagrees
    const status = new Int32Array(8);
    await hasher.decodeMany(
      rec,
      items(at, ids, (k) => 16 * k),
      hashes,
      Buffer.alloc(4096 * 8),
      status,
    );
    assert.equal(status[1], 2);
    assert.ok(status[2] === 3 || status[2] === 4, `status ${status[2]}`);
    assert.equal(status[5], 4);
    for (const k of [0, 3, 4, 6, 7]) assert.equal(status[k], 0, `record ${k}`);
  });

  it('refuses items that point outside the buffers before any work starts', () => {
    const { rec, at, hashes } = run(2);
    const out = Buffer.alloc(4096 * 2);
    const good = items(at, [1, 2], (k) => 16 * k);
    const bad = (patch: (i: Float64Array) => void): Float64Array => {
      const i = Float64Array.from(good);
      patch(i);
      return i;
    };
    const status = new Int32Array(2);
    for (const i of [
      bad((x) => (x[0] = rec.length)),
      bad((x) => (x[2] = 4096 * 2)),
      bad((x) => (x[3] = hashes.length - 8)),
      bad((x) => (x[4] = 1.5)),
    ])
      assert.throws(() => void hasher.decodeMany(rec, i, hashes, out, status), RangeError);
    assert.throws(() => void hasher.decodeMany(rec, good, hashes, out, new Int32Array(1)), TypeError);
  });

  /** A file holding `rec` at offset 1000, its descriptor passed to `use` and closed after. */
  async function withFile(rec: Buffer, use: (fd: number) => Promise<void>): Promise<void> {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bg-decode-'));
    const file = path.join(dir, 'seg');
    fs.writeFileSync(file, Buffer.concat([Buffer.alloc(1000, 0xee), rec]));
    const fd = fs.openSync(file, 'r');
    try {
      await use(fd);
    } finally {
      fs.closeSync(fd);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }

  it('reads the records from a file in the same job when given its descriptor', async () => {
    const { rec, at, blocks, hashes } = run(5);
    await withFile(rec, async (fd) => {
      const scratch = Buffer.alloc(rec.length, 0x55);
      const out = Buffer.alloc(4096 * 5);
      const status = new Int32Array(5).fill(-9);
      const i = items(at, [1, 2, 3, 4, 5], (k) => 16 * k);
      await hasher.decodeMany(scratch, i, hashes, out, status, { fd, offset: 1000 });
      assert.deepEqual([...status], [0, 0, 0, 0, 0]);
      for (let k = 0; k < 5; k++) assert.ok(out.subarray(4096 * (4 - k), 4096 * (5 - k)).equals(blocks[k]!));
    });
  });

  it('decodes the records before the end of a file cut short and fails those past it', async () => {
    const { rec, at, blocks, hashes } = run(3);
    // The file holds the first record and half of the second.
    await withFile(rec.subarray(0, at[1]! + 10), async (fd) => {
      const out = Buffer.alloc(4096 * 3, 0x11);
      const status = new Int32Array(3).fill(-9);
      const i = items(at, [1, 2, 3], (k) => 16 * k);
      await hasher.decodeMany(Buffer.alloc(rec.length, 0x77), i, hashes, out, status, { fd, offset: 1000 });
      assert.equal(status[0], 0);
      assert.ok(status[1] !== 0 && status[2] === 1, `status ${[...status]}`);
      assert.ok(out.subarray(4096 * 2).equals(blocks[0]!));
    });
  });

  it('rejects with the errno of a failed read', async () => {
    const { rec, at, hashes } = run(1);
    const out = Buffer.alloc(4096);
    const i = items(at, [1], () => 0);
    const fd = fs.openSync(os.tmpdir(), 'r'); // a directory: pread fails with EISDIR
    try {
      await assert.rejects(
        hasher.decodeMany(Buffer.alloc(rec.length), i, hashes, out, new Int32Array(1), { fd, offset: 0 }),
        (err: NodeJS.ErrnoException) => err.code === 'EISDIR' && /pread/.test(err.message),
      );
    } finally {
      fs.closeSync(fd);
    }
  });
});

describe('batch record encoding on the libuv pool', () => {
  function blocksOf(n: number): { data: Buffer; hashes: Buffer } {
    const data = Buffer.concat(
      Array.from({ length: n }, (_v, k) =>
        k % 2 ? crypto.randomBytes(4096) : Buffer.alloc(4096, `block ${k} `),
      ),
    );
    const hashes = Buffer.alloc(16 * n);
    hasher.hashBlocks(data, hashes);
    return { data, hashes };
  }

  it('packs the chosen blocks end to end, each record as the inline encoder makes it', async () => {
    const { data, hashes } = blocksOf(6);
    const chosen = [5, 0, 3, 2]; // any blocks, in any order
    const items = Float64Array.from(chosen.flatMap((index, k) => [index, 1000 + k]));
    const out = Buffer.alloc(4 * (RECORD_HEADER + 4096), 0x77);
    const lengths = new Int32Array(4);
    await native.encodeRecords(data, items, hashes, out, lengths);
    let at = 0;
    chosen.forEach((index, k) => {
      const block = data.subarray(4096 * index, 4096 * (index + 1));
      const expected = encodeRecord(1000 + k, block, hashes.subarray(16 * index, 16 * index + 16));
      assert.equal(lengths[k], expected.length, `record ${k}`);
      assert.ok(out.subarray(at, at + expected.length).equals(expected), `record ${k}`);
      at += expected.length;
    });
  });

  it('refuses items outside the data, and an output without room, before any work starts', () => {
    const { data, hashes } = blocksOf(2);
    const out = Buffer.alloc(2 * (RECORD_HEADER + 4096));
    const lengths = new Int32Array(2);
    for (const items of [
      [0, 1, 2, 2],
      [0, 1, 1.5, 2],
      [0, 1, 1, -2],
      [-1, 1, 1, 2],
    ])
      assert.throws(
        () => void native.encodeRecords(data, Float64Array.from(items), hashes, out, lengths),
        RangeError,
      );
    const good = Float64Array.from([0, 1, 1, 2]);
    assert.throws(() => void native.encodeRecords(data, good, hashes, out.subarray(1), lengths), RangeError);
    assert.throws(() => void native.encodeRecords(data, good, hashes.subarray(16), out, lengths), RangeError);
    assert.throws(() => void native.encodeRecords(data, good, hashes, out, new Int32Array(1)), TypeError);
  });
});
