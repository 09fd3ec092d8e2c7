import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { XXHash128 } from 'xxhash-addon';
import { native } from '../../native-bindings';

/** What the dedup store used to compute, and existing stores hold: xxhash-addon's keyed digest. */
function addonHash(secret: Buffer, data: Buffer): Buffer {
  const h = new XXHash128(secret);
  h.reset();
  h.update(data);
  return h.digest();
}

function ourHash(secret: Buffer, data: Buffer): Buffer {
  const out = Buffer.alloc(16);
  native.hash128Into(secret, data, out, 0);
  return out;
}

/** Bytes per block of the long-input path: the secret slides 8 bytes per 64-byte stripe. */
function blockLen(secretLength: number): number {
  return Math.floor((secretLength - 64) / 8) * 64;
}

/** The 192-byte default secret from the xxHash specification. */
const DEFAULT_SECRET = Buffer.from(
  'b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671fcb79e64eccc0e578825ad07dccff7221' +
    'b8084674f743248ee03590e6813a264c3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8' +
    'a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364eac5ac8334d3ebc3c581a0fffa1363eb' +
    '170ddd51b7f0da49d316552629d4689e2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e',
  'hex',
);

const secretArb = fc
  .oneof(fc.uint8Array({ minLength: 136, maxLength: 256 }), fc.uint8Array({ minLength: 192, maxLength: 192 }))
  .map((b) => Buffer.from(b));

/** A length for a given secret, drawn evenly from each of XXH3's size classes and boundaries. */
function lengthArb(secretLength: number): fc.Arbitrary<number> {
  const block = blockLen(secretLength);
  return fc.oneof(
    fc.constant(0),
    fc.integer({ min: 1, max: 3 }),
    fc.integer({ min: 4, max: 8 }),
    fc.integer({ min: 9, max: 16 }),
    fc.integer({ min: 17, max: 128 }),
    fc.integer({ min: 129, max: 240 }),
    fc.integer({ min: 241, max: 5000 }),
    fc.integer({ min: 4, max: 78 }).map((k) => k * 64), // whole stripes
    fc
      .tuple(fc.integer({ min: 1, max: Math.floor(5000 / block) }), fc.integer({ min: -1, max: 1 }))
      .map(([k, d]) => k * block + d), // either side of a block boundary
    fc.constant(4096),
  );
}

const secretAndDataArb = secretArb.chain((secret) =>
  lengthArb(secret.length).chain((len) =>
    fc.uint8Array({ minLength: len, maxLength: len }).map((data) => ({ secret, data: Buffer.from(data) })),
  ),
);

function sharedBytes(length: number, offset = 0): Uint8Array {
  return new Uint8Array(new SharedArrayBuffer(length + offset), offset, length);
}

describe('XXH3-128 with a custom secret', () => {
  test('equals the xxhash-addon digest for random secrets and inputs of every size class', () => {
    fc.assert(
      fc.property(secretAndDataArb, ({ secret, data }) => {
        assert.deepEqual(ourHash(secret, data), addonHash(secret, data));
      }),
      { numRuns: 2000 },
    );
  });

  test('equals the xxhash-addon digest for 4 KiB blocks under a 192-byte secret', () => {
    fc.assert(
      fc.property(
        fc.uint8Array({ minLength: 192, maxLength: 192 }),
        fc.uint8Array({ minLength: 4096, maxLength: 4096 }),
        (secret, data) => {
          assert.deepEqual(
            ourHash(Buffer.from(secret), Buffer.from(data)),
            addonHash(Buffer.from(secret), Buffer.from(data)),
          );
        },
      ),
      { numRuns: 300 },
    );
  });

  test('equals the xxhash-addon digest at every input length up to 4200 for secrets of 136, 137, 192 and 256 bytes', () => {
    const input = crypto.randomBytes(4200);
    for (const secretLength of [136, 137, 192, 256]) {
      const secret = crypto.randomBytes(secretLength);
      const addon = new XXHash128(secret);
      const out = Buffer.alloc(16);
      for (let len = 0; len <= input.length; len++) {
        const data = input.subarray(0, len);
        addon.reset();
        addon.update(data);
        native.hash128Into(secret, data, out, 0);
        assert.deepEqual(out, addon.digest(), `secret ${secretLength} bytes, input ${len} bytes`);
      }
    }
  });

  test('with the specification default secret equals unkeyed XXH3-128, e.g. 99aa06d3… for empty input', () => {
    assert.equal(
      ourHash(DEFAULT_SECRET, Buffer.alloc(0)).toString('hex'),
      '99aa06d3014798d86001c324468d497f',
    );
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 3000 }), (data) => {
        assert.deepEqual(ourHash(DEFAULT_SECRET, Buffer.from(data)), XXHash128.hash(Buffer.from(data)));
      }),
      { numRuns: 300 },
    );
  });

  test('hash128Into writes the 16 bytes at outOffset and leaves the rest of out untouched', () => {
    const secret = crypto.randomBytes(192);
    const data = crypto.randomBytes(4096);
    const out = Buffer.alloc(48, 0xaa);
    native.hash128Into(secret, data, out, 17);
    assert.deepEqual(out.subarray(17, 33), addonHash(secret, data));
    assert.ok(out.subarray(0, 17).every((b) => b === 0xaa));
    assert.ok(out.subarray(33).every((b) => b === 0xaa));
  });

  test('hash128Into reads views at unaligned offsets and over a SharedArrayBuffer', () => {
    const secret = crypto.randomBytes(200);
    const shared = Buffer.from(new SharedArrayBuffer(4096 + 3), 3, 4096);
    crypto.randomFillSync(shared);
    const copy = Buffer.from(shared);
    const out = Buffer.alloc(16);
    native.hash128Into(secret, shared, out, 0);
    assert.deepEqual(out, addonHash(secret, copy));
    native.hash128Into(secret, copy.subarray(5, 1005), out, 0);
    assert.deepEqual(out, addonHash(secret, copy.subarray(5, 1005)));
  });
});

describe('hashBlocks', () => {
  test('writes the hash of block i at out[16 * i], equal to hashing the blocks one by one', () => {
    fc.assert(
      fc.property(
        secretArb,
        fc.integer({ min: 1, max: 1300 }),
        fc.integer({ min: 0, max: 6 }),
        fc.nat(),
        (secret, blockSize, count, seed) => {
          const data = Buffer.alloc(blockSize * count);
          for (let i = 0; i < data.length; i++) data[i] = (Math.imul(i + seed, 2654435761) >>> 24) & 0xff;
          const out = Buffer.alloc(16 * count);
          native.hashBlocks(secret, data, blockSize, out);
          for (let i = 0; i < count; i++) {
            const block = data.subarray(i * blockSize, (i + 1) * blockSize);
            assert.deepEqual(out.subarray(16 * i, 16 * i + 16), ourHash(secret, block));
            assert.deepEqual(out.subarray(16 * i, 16 * i + 16), addonHash(secret, block));
          }
        },
      ),
      { numRuns: 300 },
    );
  });

  test('accepts Uint8Arrays over SharedArrayBuffers for data and out', () => {
    const secret = crypto.randomBytes(192);
    const data = sharedBytes(8 * 4096, 1);
    crypto.randomFillSync(data);
    const out = sharedBytes(8 * 16, 5);
    native.hashBlocks(secret, data, 4096, out);
    for (let i = 0; i < 8; i++) {
      const block = Buffer.from(data.subarray(i * 4096, (i + 1) * 4096));
      assert.deepEqual(Buffer.from(out.subarray(16 * i, 16 * i + 16)), addonHash(secret, block));
    }
  });

  test('writes only 16 bytes per block, leaving any spare room in out untouched', () => {
    const secret = crypto.randomBytes(192);
    const out = Buffer.alloc(64, 0xaa);
    native.hashBlocks(secret, crypto.randomBytes(2 * 4096), 4096, out);
    assert.ok(out.subarray(32).every((b) => b === 0xaa));
    native.hashBlocks(secret, Buffer.alloc(0), 4096, out.subarray(32));
    assert.ok(out.subarray(32).every((b) => b === 0xaa));
  });
});

describe('argument checks', () => {
  const secret = crypto.randomBytes(192);
  const data = Buffer.alloc(4096);

  test('a secret shorter than 136 bytes is a RangeError', () => {
    for (const length of [0, 4, 8, 135]) {
      const short = crypto.randomBytes(length);
      assert.throws(() => native.hash128Into(short, data, Buffer.alloc(16), 0), RangeError);
      assert.throws(() => native.hashBlocks(short, data, 4096, Buffer.alloc(16)), RangeError);
    }
  });

  test('hash128Into: out without 16 bytes of room at outOffset is a RangeError', () => {
    assert.throws(() => native.hash128Into(secret, data, Buffer.alloc(15), 0), RangeError);
    assert.throws(() => native.hash128Into(secret, data, Buffer.alloc(16), 1), RangeError);
    assert.throws(() => native.hash128Into(secret, data, Buffer.alloc(32), 17), RangeError);
  });

  test('hash128Into: a negative, fractional or non-finite outOffset is a RangeError', () => {
    for (const offset of [-1, 0.5, NaN, Infinity]) {
      assert.throws(() => native.hash128Into(secret, data, Buffer.alloc(32), offset), RangeError);
    }
  });

  test('arguments of the wrong type are TypeErrors', () => {
    const out = Buffer.alloc(16);
    const call =
      (fn: (...args: unknown[]) => void, ...args: unknown[]) =>
      () =>
        fn(...args);
    const into = native.hash128Into as (...args: unknown[]) => void;
    const blocks = native.hashBlocks as (...args: unknown[]) => void;
    assert.throws(call(into, 'secret'.repeat(40), data, out, 0), TypeError);
    assert.throws(call(into, secret, [1, 2, 3], out, 0), TypeError);
    assert.throws(call(into, secret, data, new ArrayBuffer(16), 0), TypeError);
    assert.throws(call(into, secret, data, out, '0'), TypeError);
    assert.throws(call(into, secret, data, out), TypeError);
    assert.throws(call(blocks, secret, 'data', 4096, out), TypeError);
    assert.throws(call(blocks, secret, data, 4096, null), TypeError);
  });

  test('hashBlocks: data whose length is not a multiple of blockSize is a RangeError', () => {
    assert.throws(() => native.hashBlocks(secret, Buffer.alloc(4097), 4096, Buffer.alloc(32)), RangeError);
  });

  test('hashBlocks: a zero, negative or fractional blockSize is a RangeError', () => {
    for (const blockSize of [0, -4096, 4096.5]) {
      assert.throws(() => native.hashBlocks(secret, data, blockSize, Buffer.alloc(16)), RangeError);
    }
  });

  test('hashBlocks: out with less than 16 bytes per block is a RangeError', () => {
    assert.throws(
      () => native.hashBlocks(secret, Buffer.alloc(3 * 1024), 1024, Buffer.alloc(47)),
      RangeError,
    );
  });

  test('hashBlocks: out overlapping data or secret is a RangeError, and nothing is written', () => {
    const slab = Buffer.alloc(4096 + 32);
    assert.throws(
      () => native.hashBlocks(secret, slab.subarray(0, 4096), 1024, slab.subarray(4080)),
      RangeError,
    );
    assert.ok(slab.every((b) => b === 0));
    const key = Buffer.concat([crypto.randomBytes(192), Buffer.alloc(64)]);
    assert.throws(() => native.hashBlocks(key, data, 1024, key.subarray(192 - 16)), RangeError);
  });
});
