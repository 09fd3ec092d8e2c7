// The seed bundle's codecs: chunks carry their checksums and are refused by
// name when damaged; META and BLOCKS payloads are checked for consistency;
// shard headers are validated; parity XOR undoes itself.

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { describe, it } from 'node:test';
import {
  ChunkReader,
  ChunkType,
  SHARD_HEADER_BYTES,
  SHARD_MAGIC,
  SHARD_VERSION,
  SeedFormatError,
  UNIT,
  decodeBlocks,
  decodeMeta,
  decodeShardHeader,
  encodeBlocks,
  encodeChunk,
  encodeMeta,
  encodeShardHeader,
  xorInto,
} from '../../protocol/seed/bundle';
import { KIND_DATA, KIND_ZERO } from '../../protocol/replication/block-kinds';

describe('seed bundle codecs', () => {
  it('parses chunks however the stream is split', () => {
    const stream = Buffer.concat([
      encodeChunk(ChunkType.HEADER, Buffer.from('{"a":1}')),
      encodeChunk(ChunkType.END, Buffer.from('{}')),
    ]);
    const r = new ChunkReader();
    const got = [];
    for (let i = 0; i < stream.length; i += 7) got.push(...r.push(stream.subarray(i, i + 7)));
    assert.deepEqual(
      got.map((c) => [c.type, c.payload.toString()]),
      [
        [ChunkType.HEADER, '{"a":1}'],
        [ChunkType.END, '{}'],
      ],
    );
    assert.equal(r.leftover, 0);
  });

  it('refuses a chunk whose payload does not match its checksum, naming it', () => {
    const c = encodeChunk(ChunkType.META, Buffer.alloc(100, 1));
    c[c.length - 1] ^= 1;
    assert.throws(() => new ChunkReader().push(c), /chunk 0 \(META\) at stream offset 0: checksum mismatch/);
  });

  it('refuses bad magic, unknown types and oversized chunks', () => {
    const c = encodeChunk(ChunkType.META, Buffer.alloc(10));
    const badMagic = Buffer.from(c);
    badMagic[0] = 0;
    assert.throws(() => new ChunkReader().push(badMagic), /bad magic/);
    const badType = Buffer.from(c);
    badType[4] = 9;
    assert.throws(() => new ChunkReader().push(badType), /unknown type 9/);
    const long = Buffer.from(c);
    long.writeUInt32BE(0x7fffffff, 8);
    assert.throws(() => new ChunkReader().push(long), /too long/);
  });

  it('round-trips META and refuses one whose content ids do not match its kinds', () => {
    const kinds = Buffer.from([KIND_DATA, 0, KIND_ZERO, KIND_DATA]);
    const cids = crypto.randomBytes(32);
    const run = decodeMeta(encodeMeta({ lba: 2048, kinds, cids }), KIND_DATA);
    assert.equal(run.lba, 2048);
    assert.ok(run.kinds.equals(kinds) && run.cids.equals(cids));
    assert.throws(
      () => decodeMeta(encodeMeta({ lba: 0, kinds, cids: cids.subarray(16) }), KIND_DATA),
      SeedFormatError,
    );
  });

  it('round-trips BLOCKS and refuses impossible lengths and flags', () => {
    const blocks = [
      { cid: crypto.randomBytes(16), lz4: true, payload: crypto.randomBytes(100) },
      { cid: crypto.randomBytes(16), lz4: false, payload: crypto.randomBytes(4096) },
    ];
    const back = decodeBlocks(encodeBlocks(blocks));
    assert.deepEqual(
      back.map((b) => [b.cid.toString('hex'), b.lz4, b.payload.length]),
      blocks.map((b) => [b.cid.toString('hex'), b.lz4, b.payload.length]),
    );
    const bad = encodeBlocks(blocks.slice(0, 1));
    bad.writeUInt16BE(5000, 17);
    assert.throws(() => decodeBlocks(bad), /block of 5000 bytes/);
    const flags = encodeBlocks(blocks.slice(0, 1));
    flags[16] = 7;
    assert.throws(() => decodeBlocks(flags), /unknown block flags/);
    assert.throws(() => decodeBlocks(Buffer.alloc(5)), /ends inside a block header/);
  });

  it('validates shard headers', () => {
    const h = {
      magic: SHARD_MAGIC,
      version: SHARD_VERSION,
      bundleId: 'ab'.repeat(16),
      shard: 1,
      shards: 3,
      unit: UNIT,
      streamBytes: 12345,
      complete: true,
    };
    assert.deepEqual(decodeShardHeader(encodeShardHeader(h), 'f'), h);
    assert.throws(() => decodeShardHeader(encodeShardHeader({ ...h, shard: 3 }), 'f'), /inconsistent/);
    assert.throws(() => decodeShardHeader(encodeShardHeader({ ...h, version: 9 }), 'f'), /version 9/);
    assert.throws(
      () => decodeShardHeader(Buffer.alloc(SHARD_HEADER_BYTES, 0x41), 'f'),
      /not a blockgate seed bundle/,
    );
  });

  it('XOR parity rebuilds any one unit of a row from the others', () => {
    const row = [crypto.randomBytes(UNIT), crypto.randomBytes(UNIT)].map((b) => Buffer.from(b));
    const parity = Buffer.alloc(UNIT);
    for (const u of row) xorInto(parity, u);
    const rebuilt = Buffer.alloc(UNIT);
    xorInto(rebuilt, row[1]!);
    xorInto(rebuilt, parity);
    assert.ok(rebuilt.equals(row[0]!));
  });
});
