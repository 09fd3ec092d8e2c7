import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { describe, it } from 'node:test';
import {
  BlockHasher,
  CorruptBlockError,
  decodeRecordAt,
  encodeRecord,
} from '../../gateway/store/block-codec';

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
