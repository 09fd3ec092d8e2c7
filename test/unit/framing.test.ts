import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { record } from './plain-record';
import { Cmd, Size } from '../../protocol/nbd/constants';
import { ByteQueue } from '../../protocol/nbd/byte-queue';
import {
  HandshakeMessage,
  HandshakeReader,
  IncomingRequest,
  RequestReader,
} from '../../protocol/nbd/framing';
import { encodeOption } from '../../protocol/nbd/handshake';
import { encodeRequest, Request } from '../../protocol/nbd/transmission';

const MAX_PAYLOAD = 64;

interface Sent {
  req: Request;
  payload: Buffer | null;
}

const sentArb: fc.Arbitrary<Sent> = fc
  .record({
    type: fc.constantFrom(Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.BLOCK_STATUS, 99),
    flags: fc.integer({ min: 0, max: 0xffff }),
    cookieLo: fc.integer({ min: 0, max: 0xffffffff }),
    offset: fc.integer({ min: 0, max: 2 ** 40 }),
    payload: fc.uint8Array({ minLength: 1, maxLength: MAX_PAYLOAD + 16 }),
    length: fc.integer({ min: 0, max: 1 << 20 }),
  })
  .map(({ type, flags, cookieLo, offset, payload, length }) => {
    const isWrite = type === Cmd.WRITE;
    const data = Buffer.from(payload);
    return {
      req: { type, flags, cookieHi: 7, cookieLo, offset, length: isWrite ? data.length : length },
      payload: isWrite ? data : null,
    };
  });

function wire(sent: Sent[]): Buffer {
  return Buffer.concat(
    sent.map(({ req, payload }) => {
      const h = Buffer.alloc(Size.REQUEST);
      encodeRequest(req, h, 0);
      return payload ? Buffer.concat([h, payload]) : h;
    }),
  );
}

function expected(sent: Sent[]): IncomingRequest[] {
  return sent.map(({ req, payload }) => {
    const oversized = payload !== null && payload.length > MAX_PAYLOAD;
    return { ...req, payload: oversized ? null : payload, oversized, assembled: false };
  });
}

function parseChunks(chunks: Buffer[]): IncomingRequest[] {
  const reader = new RequestReader(MAX_PAYLOAD);
  const out: IncomingRequest[] = [];
  for (const c of chunks) {
    reader.push(c);
    // Whether a payload was assembled depends on the split, not on the stream.
    for (let r = reader.next(); r !== null; r = reader.next()) out.push({ ...r, assembled: false });
  }
  return out;
}

/** Cuts a buffer at the given sorted positions. */
function cut(buf: Buffer, at: number[]): Buffer[] {
  const points = [0, ...at, buf.length];
  return points.slice(1).map((end, i) => buf.subarray(points[i], end));
}

describe('request framing', () => {
  it('parses the same requests wherever the stream is split in two', () => {
    fc.assert(
      fc.property(fc.array(sentArb, { minLength: 1, maxLength: 4 }), (sent) => {
        const bytes = wire(sent);
        const want = expected(sent);
        for (let i = 0; i <= bytes.length; i++) {
          assert.deepEqual(parseChunks([bytes.subarray(0, i), bytes.subarray(i)]), want);
        }
      }),
      { numRuns: 60 },
    );
  });

  it('parses the same requests however the stream is chopped', () => {
    fc.assert(
      fc.property(
        fc.array(sentArb, { minLength: 1, maxLength: 8 }),
        fc.array(fc.nat(), { maxLength: 20 }),
        (sent, rawCuts) => {
          const bytes = wire(sent);
          const cuts = [...new Set(rawCuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
          assert.deepEqual(parseChunks(cut(bytes, cuts)), expected(sent));
        },
      ),
    );
  });

  it('reads and drops the payload of an oversized WRITE, then goes on', () => {
    const big = Buffer.alloc(MAX_PAYLOAD + 1, 0xaa);
    const sent: Sent[] = [
      {
        req: { type: Cmd.WRITE, flags: 0, cookieHi: 0, cookieLo: 1, offset: 0, length: big.length },
        payload: big,
      },
      { req: { type: Cmd.READ, flags: 0, cookieHi: 0, cookieLo: 2, offset: 0, length: 512 }, payload: null },
    ];
    const got = parseChunks([wire(sent)]);
    assert.equal(got.length, 2);
    assert.equal(got[0]!.oversized, true);
    assert.equal(got[0]!.payload, null);
    assert.equal(got[1]!.cookieLo, 2);
  });

  it('parses the same requests when reads land in place wherever it asks', () => {
    // A socket that, like direct-socket.ts, reads into inPlaceTarget() when there is one.
    fc.assert(
      fc.property(
        fc.array(sentArb, { minLength: 1, maxLength: 8 }),
        fc.array(fc.integer({ min: 1, max: 40 }), { minLength: 1, maxLength: 20 }),
        (sent, readSizes) => {
          const bytes = wire(sent);
          const reader = new RequestReader(MAX_PAYLOAD);
          const out: IncomingRequest[] = [];
          for (let at = 0, i = 0; at < bytes.length; i++) {
            const target = reader.inPlaceTarget();
            const n = Math.min(
              readSizes[i % readSizes.length]!,
              bytes.length - at,
              target?.length ?? Infinity,
            );
            if (target) {
              bytes.copy(target, 0, at, at + n);
              reader.receivedInPlace(n);
            } else reader.push(bytes.subarray(at, at + n));
            at += n;
            for (let r = reader.next(); r !== null; r = reader.next()) out.push({ ...r, assembled: false });
          }
          assert.deepEqual(out, expected(sent));
        },
      ),
    );
  });

  it('refuses bytes received in place when no payload is waiting for them', () => {
    const reader = new RequestReader(MAX_PAYLOAD);
    assert.equal(reader.inPlaceTarget(), null);
    assert.throws(() => reader.receivedInPlace(1), RangeError);
  });

  it('throws on a bad magic', () => {
    const reader = new RequestReader(MAX_PAYLOAD);
    reader.push(Buffer.alloc(Size.REQUEST));
    assert.throws(() => reader.next(), { code: 'ERR_NBD_BAD_MAGIC' });
  });
});

describe('handshake framing', () => {
  const limits = { maxOptionData: 32, maxOptionDiscard: 256 };

  function handshakeBytes(options: Array<{ option: number; data: Buffer }>): Buffer {
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(3);
    return Buffer.concat([flags, ...options.map((o) => encodeOption(o.option, o.data))]);
  }

  function parse(chunks: Buffer[]): HandshakeMessage[] {
    const reader = new HandshakeReader(limits);
    const out: HandshakeMessage[] = [];
    for (const c of chunks) {
      reader.push(c);
      for (let m = reader.next(); m !== null; m = reader.next()) out.push(m);
    }
    return out;
  }

  it('parses the same messages wherever the stream is split in two', () => {
    const optionArb = record({
      option: fc.integer({ min: 0, max: 0xffffffff }),
      data: fc.uint8Array({ maxLength: 100 }).map((a) => Buffer.from(a)),
    });
    fc.assert(
      fc.property(fc.array(optionArb, { minLength: 1, maxLength: 4 }), (options) => {
        const bytes = handshakeBytes(options);
        const want: HandshakeMessage[] = [
          { kind: 'client-flags', flags: 3 },
          ...options.map((o): HandshakeMessage =>
            o.data.length > limits.maxOptionData
              ? { kind: 'oversized-option', option: o.option, length: o.data.length }
              : { kind: 'option', option: o.option, data: o.data },
          ),
        ];
        for (let i = 0; i <= bytes.length; i++) {
          assert.deepEqual(parse([bytes.subarray(0, i), bytes.subarray(i)]), want);
        }
      }),
      { numRuns: 40 },
    );
  });

  it('hands over the bytes after the last option to the next phase', () => {
    const bytes = Buffer.concat([
      handshakeBytes([{ option: 7, data: Buffer.alloc(3) }]),
      Buffer.from('rest'),
    ]);
    const reader = new HandshakeReader(limits);
    reader.push(bytes);
    reader.next();
    reader.next();
    assert.equal(Buffer.concat(reader.remainder()).toString(), 'rest');
  });

  it('refuses an option too large to even read', () => {
    const reader = new HandshakeReader(limits);
    reader.push(handshakeBytes([{ option: 1, data: Buffer.alloc(300) }]));
    reader.next();
    assert.throws(() => reader.next(), { code: 'ERR_NBD_TOO_BIG' });
  });
});

describe('byte queue', () => {
  it('returns bytes in order across chunk boundaries', () => {
    fc.assert(
      fc.property(
        fc.array(fc.uint8Array({ maxLength: 10 })),
        fc.array(fc.nat({ max: 12 })),
        (chunks, takes) => {
          const q = new ByteQueue();
          const all = Buffer.concat(chunks.map((c) => Buffer.from(c)));
          for (const c of chunks) q.push(Buffer.from(c));
          let at = 0;
          for (const n of takes) {
            if (n > q.length) break;
            assert.deepEqual(q.take(n), all.subarray(at, at + n));
            at += n;
          }
          assert.deepEqual(Buffer.concat(q.drain()), all.subarray(at));
        },
      ),
    );
  });
});
