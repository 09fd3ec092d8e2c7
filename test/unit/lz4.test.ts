import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { compressSync, uncompressSync } from 'lz4-napi';
import { native } from '../../native-bindings';

/** 4 KiB blocks shaped like disk contents: runs, short periods, text, random spans. */
const blockArb = fc
  .array(
    fc.oneof(
      fc.record({ kind: fc.constant('run'), byte: fc.nat(255), len: fc.integer({ min: 1, max: 2048 }) }),
      fc.record({
        kind: fc.constant('period'),
        pattern: fc.uint8Array({ minLength: 1, maxLength: 40 }),
        len: fc.integer({ min: 1, max: 2048 }),
      }),
      fc.record({ kind: fc.constant('random'), bytes: fc.uint8Array({ minLength: 1, maxLength: 1024 }) }),
    ),
    { minLength: 1, maxLength: 12 },
  )
  .map((parts) => {
    const b = Buffer.alloc(4096);
    let at = 0;
    for (const p of parts) {
      if (at >= 4096) break;
      if (p.kind === 'run') {
        const end = Math.min(4096, at + p.len);
        b.fill(p.byte, at, end);
        at = end;
      } else if (p.kind === 'period') {
        for (let i = 0; i < p.len && at < 4096; i++) b[at++] = p.pattern[i % p.pattern.length]!;
      } else {
        for (let i = 0; i < p.bytes.length && at < 4096; i++) b[at++] = p.bytes[i]!;
      }
    }
    return b;
  });

function sizePrefixed(block: Buffer, packed: Buffer): Buffer {
  const pre = Buffer.alloc(4);
  pre.writeUInt32LE(block.length);
  return Buffer.concat([pre, packed]);
}

describe('lz4 block codec', () => {
  it('writes blocks that lz4-napi reads back exactly', () => {
    fc.assert(
      fc.property(blockArb, (block) => {
        const dst = Buffer.alloc(block.length);
        const n = native.lz4Compress(block, dst);
        if (n < 0) return; // incompressible: stored raw
        assert.ok(uncompressSync(sizePrefixed(block, dst.subarray(0, n))).equals(block));
      }),
      { numRuns: 500 },
    );
  });

  it('reads blocks that lz4-napi wrote', () => {
    fc.assert(
      fc.property(blockArb, (block) => {
        const out = Buffer.alloc(4096);
        assert.equal(native.lz4Decompress(compressSync(block).subarray(4), out), 4096);
        assert.ok(out.equals(block));
      }),
      { numRuns: 500 },
    );
  });

  it('reports -1 when the output does not fit, so the block is stored raw', () => {
    const random = crypto.randomBytes(4096);
    assert.equal(native.lz4Compress(random, Buffer.alloc(4095)), -1);
  });

  it('refuses malformed payloads without reading or writing out of bounds', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), (junk) => {
        const out = Buffer.alloc(4096);
        const n = native.lz4Decompress(Buffer.from(junk), out);
        assert.ok(n === -1 || (n >= 0 && n <= 4096));
      }),
      { numRuns: 2000 },
    );
  });
});
