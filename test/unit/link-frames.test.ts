import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { LinkProtocolError } from '../../protocol/replication/errors';
import { decodeFrameBody, encodeFrame, Frame, FrameReader } from '../../protocol/replication/frames';

const bytes = (n: number): fc.Arbitrary<Buffer> =>
  fc.uint8Array({ minLength: n, maxLength: n }).map((a) => Buffer.from(a));

const frameArb: fc.Arbitrary<Frame> = fc.oneof(
  fc
    .record({
      version: fc.integer({ min: 0, max: 0xffffffff }),
      gatewayId: bytes(16).map((b) => b.toString('hex')),
      nonce: bytes(32),
      maxFrame: fc.integer({ min: 0, max: 0xffffffff }),
    })
    .map(({ version, gatewayId, nonce, maxFrame }) => ({ hello: { version, gatewayId, nonce, maxFrame } })),
  bytes(32).map((mac) => ({ proof: { mac } })),
  fc
    .record({ code: fc.string(), message: fc.string() })
    .map(({ code, message }) => ({ error: { code, message } })),
  fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }).map((seq) => ({ ping: { seq } })),
  fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }).map((seq) => ({ pong: { seq } })),
);

function readAll(reader: FrameReader, chunks: Buffer[]): Frame[] {
  const out: Frame[] = [];
  for (const c of chunks) {
    reader.push(c);
    for (let f = reader.next(); f !== null; f = reader.next()) out.push(f);
  }
  return out;
}

describe('replication link frames', () => {
  it('round-trip every message wherever the stream is split', () => {
    fc.assert(
      fc.property(fc.array(frameArb, { minLength: 1, maxLength: 4 }), (frames) => {
        const wire = Buffer.concat(frames.map(encodeFrame));
        for (let i = 0; i <= wire.length; i++) {
          const got = readAll(new FrameReader(1 << 20), [wire.subarray(0, i), wire.subarray(i)]);
          assert.deepEqual(got, frames);
        }
      }),
      { numRuns: 40 },
    );
  });

  it('round-trip a verify request for a slice of chunks, with its first chunk', () => {
    const frame: Frame = { verifyChunks: { seq: 3, first: 8192, digests: Buffer.alloc(64, 0x5a) } };
    const [got] = readAll(new FrameReader(1 << 20), [encodeFrame(frame)]);
    assert.deepEqual(got, frame);
  });

  it('round-trip a batch whose extents hold no data (empty content ids) and its blocks', () => {
    const frame: Frame = {
      batch: {
        seq: 7,
        durable: true,
        extents: [
          { lba: 10, kinds: Buffer.from([0, 1, 0]), cids: Buffer.alloc(0) },
          { lba: 40, kinds: Buffer.from([2]), cids: Buffer.alloc(16, 0xab) },
        ],
        blocks: [
          { ordinal: 0, lz4: true, payload: Buffer.from('compressed bytes') },
          { ordinal: 1, lz4: false, payload: Buffer.alloc(0) },
        ],
      },
    };
    const [got] = readAll(new FrameReader(1 << 20), [encodeFrame(frame)]);
    assert.deepEqual(got, frame);
  });

  it("decode block payloads as views of the frame's bytes, not copies", () => {
    const payload = Buffer.alloc(3000, 0x5a);
    const wire = encodeFrame({ blocks: { seq: 1, blocks: [{ ordinal: 0, lz4: true, payload }] } });
    const got = decodeFrameBody(wire.subarray(4)) as { blocks: { blocks: Array<{ payload: Buffer }> } };
    const view = got.blocks.blocks[0]!.payload;
    assert.ok(view.equals(payload));
    // A view sees the frame's bytes change; a copy (even one in the same pool) would not.
    wire.fill(0x33, 4);
    assert.ok(view.every((b) => b === 0x33));
  });

  it('round-trip a batch of many blocks, its lengths past one varint byte, split anywhere', () => {
    const blocks = Array.from({ length: 300 }, (_, i) => ({
      ordinal: i * 3,
      lz4: i % 2 === 0,
      payload: Buffer.alloc(1000 + i * 10, i),
    }));
    const frame: Frame = {
      batch: {
        seq: 2 ** 40,
        durable: false,
        extents: [{ lba: 5, kinds: Buffer.from([1]), cids: Buffer.alloc(0) }],
        blocks,
      },
    };
    const wire = encodeFrame(frame);
    for (const cut of [1, 5, 7, 300, 4096, wire.length - 1]) {
      const got = readAll(new FrameReader(1 << 20), [wire.subarray(0, cut), wire.subarray(cut)]);
      assert.deepEqual(got, [frame]);
    }
  });

  // Frame{blocks: Blocks{seq: 1, block_table, block_data}} written by hand (every length < 128).
  const blocksBody = (table: Buffer, data: Buffer): Buffer => {
    const inner = Buffer.concat([
      Buffer.from([0x08, 0x01, 0x1a, table.length]),
      table,
      Buffer.from([0x22, data.length]),
      data,
    ]);
    return Buffer.concat([Buffer.from([0x52, inner.length]), inner]);
  };
  const entry = (ordinal: number, word: number): Buffer => {
    const e = Buffer.alloc(8);
    e.writeUInt32LE(ordinal, 0);
    e.writeUInt32LE(word, 4);
    return e;
  };
  const malformed = (body: Buffer, message: RegExp) =>
    assert.throws(
      () => decodeFrameBody(body),
      (e: unknown) =>
        e instanceof LinkProtocolError && e.code === 'ERR_LINK_MALFORMED' && message.test(e.message),
    );

  it('decode a hand-written block table: ordinal, length and the LZ4 bit', () => {
    const data = Buffer.from('abcdefgh');
    const got = decodeFrameBody(blocksBody(Buffer.concat([entry(4, 0x80000003), entry(9, 5)]), data));
    assert.deepEqual(got, {
      blocks: {
        seq: 1,
        blocks: [
          { ordinal: 4, lz4: true, payload: Buffer.from('abc') },
          { ordinal: 9, lz4: false, payload: Buffer.from('defgh') },
        ],
      },
    });
  });

  it('refuse a block table entry that runs past the block data', () => {
    malformed(blocksBody(entry(0, 10), Buffer.alloc(5)), /runs past the 5 bytes of block data/);
  });

  it('refuse block data the table does not account for', () => {
    malformed(blocksBody(entry(0, 3), Buffer.alloc(5)), /2 bytes of block data beyond the block table/);
  });

  it('refuse a block table that is not whole entries', () => {
    malformed(blocksBody(Buffer.alloc(7), Buffer.alloc(0)), /block table of 7 bytes/);
  });

  it('refuse a frame longer than the limit from its length alone', () => {
    const reader = new FrameReader(1024);
    const header = Buffer.alloc(4);
    header.writeUInt32BE(1025, 0);
    reader.push(header);
    assert.throws(
      () => reader.next(),
      (e: unknown) => e instanceof LinkProtocolError && e.code === 'ERR_LINK_FRAME_TOO_LARGE',
    );
  });

  it('accept longer frames once the limit is raised', () => {
    const big: Frame = { error: { code: 'X', message: 'm'.repeat(4000) } };
    const reader = new FrameReader(1024);
    reader.setLimit(1 << 20);
    assert.deepEqual(readAll(reader, [encodeFrame(big)]), [big]);
  });

  it('refuse a message type this version does not know', () => {
    // Field 99, length-delimited, empty: a body from a future version.
    const body = Buffer.from([0x9a, 0x06, 0x00]);
    assert.throws(
      () => decodeFrameBody(body),
      (e: unknown) => e instanceof LinkProtocolError && e.code === 'ERR_LINK_UNKNOWN_MESSAGE',
    );
  });

  it('refuse bytes that are not a protobuf message', () => {
    assert.throws(
      () => decodeFrameBody(Buffer.from([0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f])),
      (e: unknown) => e instanceof LinkProtocolError && e.code === 'ERR_LINK_MALFORMED',
    );
  });
});
