// The reply slab allocator: slices never overlap while they are out, and a slab
// comes back for reuse only once every slice of it has been freed.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { SlabAllocator } from '../../gateway/util/slab';

describe('SlabAllocator', () => {
  it('reuses a full slab once all its slices are freed, and not before', () => {
    const slab = new SlabAllocator(64, 32);
    const a = slab.alloc(24);
    const b = slab.alloc(24);
    const c = slab.alloc(24); // the first slab is full: c starts a second one
    assert.notEqual(c.buffer, a.buffer);
    slab.free(a);
    const d = slab.alloc(24);
    assert.equal(d.buffer, c.buffer, 'a slab with b still out is not reused');
    slab.free(b); // the first slab is now empty: a spare
    const e = slab.alloc(24); // the second slab (c, d) is full: the spare serves
    assert.equal(e.buffer, a.buffer, 'the emptied slab serves the next');
  });

  it('hands out slices that never overlap while out, under random frees', () => {
    const slab = new SlabAllocator(4096, 600);
    const out: Buffer[] = [];
    for (let step = 0; step < 5000; step++) {
      if (out.length && Math.random() < 0.45) {
        const k = Math.floor(Math.random() * out.length);
        const [gone] = out.splice(k, 1);
        slab.free(gone!);
      } else {
        const s = slab.alloc(1 + Math.floor(Math.random() * 600));
        s.fill(step & 0xff);
        out.push(s);
      }
      if (step % 97 === 0) {
        for (const s of out) {
          const v = s[0];
          assert.ok(
            s.every((x) => x === v),
            'a slice out was written by another',
          );
        }
      }
    }
  });

  it('ignores frees of buffers it did not hand out, and large allocations stand alone', () => {
    const slab = new SlabAllocator(64, 32);
    const big = slab.alloc(100);
    assert.equal(big.length, 100);
    slab.free(big);
    slab.free(Buffer.alloc(8));
    const a = slab.alloc(8);
    assert.notEqual(a.buffer, big.buffer);
  });
});
