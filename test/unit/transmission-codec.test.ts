import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { record } from './plain-record';
import { ChunkType, Size } from '../../protocol/nbd/constants';
import {
  chunkPayloadSize,
  ChunkPayload,
  decodeChunkHeader,
  decodeChunkPayload,
  decodeRequest,
  decodeSimpleReply,
  encodeChunk,
  encodeRequest,
  encodeSimpleReply,
} from '../../protocol/nbd/transmission';

const u32 = fc.integer({ min: 0, max: 0xffffffff });
const u16 = fc.integer({ min: 0, max: 0xffff });
const offset = fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER });

export const requestArb = record({
  flags: u16,
  type: u16,
  cookieHi: u32,
  cookieLo: u32,
  offset,
  length: u32,
});

const chunkArb: fc.Arbitrary<ChunkPayload> = fc.oneof(
  fc.constant({ type: ChunkType.NONE } as ChunkPayload),
  record({
    type: fc.constant(ChunkType.OFFSET_DATA),
    offset,
    data: fc.uint8Array({ minLength: 1, maxLength: 64 }).map((a) => Buffer.from(a)),
  }),
  record({ type: fc.constant(ChunkType.OFFSET_HOLE), offset, holeLength: u32 }),
  record({
    type: fc.constant(ChunkType.BLOCK_STATUS),
    contextId: u32,
    extents: fc.array(record({ length: u32, flags: u32 }), { minLength: 1, maxLength: 8 }),
  }),
  record({ type: fc.constant(ChunkType.ERROR), error: u32, message: fc.string({ maxLength: 40 }) }),
  record({
    type: fc.constant(ChunkType.ERROR_OFFSET),
    error: u32,
    message: fc.string({ maxLength: 40 }),
    offset,
  }),
);

describe('transmission codecs', () => {
  it('round-trips every request header', () => {
    fc.assert(
      fc.property(requestArb, (req) => {
        const buf = Buffer.alloc(Size.REQUEST);
        assert.equal(encodeRequest(req, buf, 0), Size.REQUEST);
        assert.deepEqual(decodeRequest(buf, 0), req);
      }),
    );
  });

  it('decodes the request layout of the spec byte for byte', () => {
    const wire = Buffer.from(
      '25609513' + '0001' + '0001' + '0102030405060708' + '0000000100000000' + '00001000',
      'hex',
    );
    assert.deepEqual(decodeRequest(wire, 0), {
      flags: 1,
      type: 1,
      cookieHi: 0x01020304,
      cookieLo: 0x05060708,
      offset: 2 ** 32,
      length: 4096,
    });
  });

  it('refuses a request with a bad magic', () => {
    const buf = Buffer.alloc(Size.REQUEST);
    assert.throws(() => decodeRequest(buf, 0), { code: 'ERR_NBD_BAD_MAGIC' });
  });

  it('decodes offsets beyond 2^53 to a value past any export', () => {
    const buf = Buffer.alloc(Size.REQUEST);
    encodeRequest({ flags: 0, type: 0, cookieHi: 0, cookieLo: 0, offset: 0, length: 1 }, buf, 0);
    buf.writeUInt32BE(0xffffffff, 16);
    assert.ok(decodeRequest(buf, 0).offset > 2 ** 53);
  });

  it('round-trips every simple reply', () => {
    fc.assert(
      fc.property(u32, u32, u32, (error, cookieHi, cookieLo) => {
        const buf = Buffer.alloc(Size.SIMPLE_REPLY);
        encodeSimpleReply(buf, 0, error, cookieHi, cookieLo);
        assert.deepEqual(decodeSimpleReply(buf, 0), { error, cookieHi, cookieLo });
      }),
    );
  });

  it('round-trips every structured chunk type', () => {
    fc.assert(
      fc.property(u16, u32, u32, chunkArb, (flags, cookieHi, cookieLo, payload) => {
        const buf = encodeChunk(flags, cookieHi, cookieLo, payload);
        const h = decodeChunkHeader(buf, 0);
        assert.deepEqual(h, {
          flags,
          type: payload.type,
          cookieHi,
          cookieLo,
          length: chunkPayloadSize(payload),
        });
        assert.equal(buf.length, Size.STRUCTURED_REPLY_HEADER + h.length);
        assert.deepEqual(decodeChunkPayload(h.type, buf.subarray(Size.STRUCTURED_REPLY_HEADER)), payload);
      }),
    );
  });

  it('encodes the error chunk type as 0x8001, not 1 << 15 + 1', () => {
    const buf = encodeChunk(1, 0, 0, { type: ChunkType.ERROR, error: 22, message: '' });
    assert.equal(buf.readUInt16BE(6), 0x8001);
    assert.equal(ChunkType.BLOCK_STATUS, 5);
  });

  it('refuses a block status payload that is not whole extents', () => {
    assert.throws(() => decodeChunkPayload(ChunkType.BLOCK_STATUS, Buffer.alloc(7)), {
      code: 'ERR_NBD_TRUNCATED',
    });
  });
});
