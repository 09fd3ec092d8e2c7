// The in-memory hash index against a Map: random sets, adds and deletes on a
// small table (so probe runs collide, wrap around and grow), every key found
// where the Map has it and nowhere else.

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { describe, it } from 'node:test';
import { HashIndex } from '../../gateway/store/hash-index';

/** A 16-byte hash whose low bits are few, so entries pile into the same slots. */
function hash(n: number): Buffer {
  const b = crypto.createHash('sha256').update(String(n)).digest().subarray(0, 16);
  b.writeUInt32LE(n % 37, 0); // home slot from n % 37: long probe runs
  b.writeUInt32LE(n, 4);
  return b;
}

describe('hash index', () => {
  it('matches a Map through random sets, adds and deletes, across growth and wrap-around', () => {
    const index = new HashIndex(16);
    const model = new Map<number, number>();
    let nextId = 1;
    for (let step = 0; step < 20000; step++) {
      const n = crypto.randomInt(400);
      const r = crypto.randomInt(10);
      if (r < 5) {
        const id = nextId++;
        index.set(hash(n), id);
        model.set(n, id);
      } else if (r < 6) {
        const id = nextId++;
        index.add(hash(n), id);
        if (!model.has(n)) model.set(n, id);
      } else if (model.has(n) && r < 9) {
        // Deleting with a stale id changes nothing; with the filed one it removes it.
        index.delete(hash(n), model.get(n)! + 1e9);
        index.delete(hash(n), model.get(n)!);
        model.delete(n);
      }
      if (step % 997 === 0 || step === 19999) {
        for (let k = 0; k < 400; k++)
          assert.equal(index.get(hash(k)), model.get(k), `key ${k} at step ${step}`);
        assert.equal(index.size, model.size);
      }
    }
  });

  it('keeps the first block filed by add, and the last by set', () => {
    const index = new HashIndex();
    const h = crypto.randomBytes(16);
    index.add(h, 5);
    index.add(h, 9);
    assert.equal(index.get(h), 5);
    index.set(h, 9);
    assert.equal(index.get(h), 9);
  });
});
