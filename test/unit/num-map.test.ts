// The overlays' typed-array maps against JS Maps: random sets, adds, deletes and
// clears over keys of every size the store uses (block ids, metamap keys past
// 2^32, the largest safe integer), so probe runs collide, wrap and regrow.

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { describe, it } from 'node:test';
import { NumMap } from '../../gateway/store/num-map';
import { NewData } from '../../gateway/store/overlay';
import { MASK_BLOCK, metaKey } from '../../gateway/store/layout';

function randomKey(): number {
  switch (crypto.randomInt(4)) {
    case 0:
      return crypto.randomInt(300);
    case 1:
      return metaKey(1 + crypto.randomInt(3), crypto.randomInt(200));
    case 2:
      return 2 ** 40 * crypto.randomInt(50);
    default:
      return MASK_BLOCK - crypto.randomInt(10);
  }
}

function assertSame(map: NumMap, model: Map<number, number>): void {
  assert.equal(map.size, model.size);
  for (const [k, v] of model) assert.equal(map.get(k), v, `key ${k}`);
  const seen = new Map<number, number>();
  map.forEach((v, k) => seen.set(k, v));
  assert.deepEqual(
    new Map([...seen].sort((a, b) => a[0] - b[0])),
    new Map([...model].sort((a, b) => a[0] - b[0])),
  );
}

describe('NumMap', () => {
  it('matches a Map through random sets, adds, deletes and clears', () => {
    const map = new NumMap(4);
    const model = new Map<number, number>();
    for (let step = 0; step < 30000; step++) {
      const k = randomKey();
      const r = crypto.randomInt(20);
      if (r < 8) {
        const v = crypto.randomInt(-5, 1000);
        map.set(k, v);
        model.set(k, v);
      } else if (r < 13) {
        const d = crypto.randomInt(-2, 3);
        map.add(k, d);
        const v = (model.get(k) ?? 0) + d;
        if (v === 0) model.delete(k);
        else model.set(k, v);
      } else if (r < 19) {
        assert.equal(map.delete(k), model.delete(k));
      } else if (step % 1000 === 0) {
        map.clear();
        model.clear();
      }
      assert.equal(map.get(k), model.get(k));
      assert.equal(map.has(k), model.has(k));
      if (step % 997 === 0) assertSame(map, model);
    }
    assertSame(map, model);
  });

  it('finds every key after deletes from the middle of long probe runs', () => {
    const map = new NumMap(4);
    for (let i = 0; i < 5000; i++) map.set(i * 64, i);
    for (let i = 0; i < 5000; i += 3) assert.equal(map.delete(i * 64), true);
    for (let i = 0; i < 5000; i++) assert.equal(map.get(i * 64), i % 3 === 0 ? undefined : i);
    assert.equal(map.size, 5000 - Math.ceil(5000 / 3));
  });

  it('keeps working after clear, with the old entries gone', () => {
    const map = new NumMap();
    for (let i = 0; i < 1000; i++) map.set(i, i + 1);
    map.clear();
    assert.equal(map.size, 0);
    assert.equal(map.get(5), undefined);
    map.set(5, 6);
    assert.equal(map.get(5), 6);
    assert.equal(map.size, 1);
  });
});

describe('NewData', () => {
  it('returns what was set by id, overwrites in place, and forgets everything on clear', () => {
    const table = new NewData();
    const hash = (n: number): Buffer => Buffer.alloc(16, n);
    for (let id = 1; id <= 3000; id++)
      table.set(id * 7, {
        segment: id % 5,
        offset: id * 100,
        storedLength: id % 4096,
        flags: id % 2,
        hash: hash(id),
      });
    table.set(14, { segment: 9, offset: 9, storedLength: 9, flags: 1, hash: hash(99) });
    assert.equal(table.size, 3000);
    assert.deepEqual(table.get(14), {
      segment: 9,
      offset: 9,
      storedLength: 9,
      flags: 1,
      refcount: 0,
      hash: hash(99),
    });
    assert.equal(table.get(21)?.offset, 300);
    assert.equal(table.get(22), undefined);
    const order: number[] = [];
    table.forEach((id) => order.push(id));
    assert.deepEqual(order.slice(0, 3), [7, 14, 21]);
    table.clear();
    assert.equal(table.size, 0);
    assert.equal(table.get(7), undefined);
    assert.equal(table.idList().length, 0);
  });
});
