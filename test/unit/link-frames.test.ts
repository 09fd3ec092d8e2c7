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
