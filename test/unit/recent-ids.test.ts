import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { RecentIds } from '../../gateway/util/recent-ids';

describe('RecentIds', () => {
  it('remembers the last `capacity` distinct ids and forgets the oldest first', () => {
    const r = new RecentIds(3);
    for (const id of [1, 2, 3, 4]) r.add(id);
    assert.deepEqual(
      [1, 2, 3, 4].map((id) => r.has(id)),
      [false, true, true, true],
    );
    r.add(5);
    assert.equal(r.has(2), false);
    assert.equal(r.size, 3);
  });

  it('does not count an id added again as a new arrival', () => {
    const r = new RecentIds(2);
    r.add(1);
    r.add(2);
    r.add(1); // already present: 1 stays the oldest
    r.add(3);
    assert.equal(r.has(1), false);
    assert.ok(r.has(2) && r.has(3));
  });

  it('keeps up under long churn, with ids up to 2^53', () => {
    const r = new RecentIds(1000);
    const base = 2 ** 52;
    for (let i = 0; i < 200_000; i++) r.add(base + i);
    assert.equal(r.size, 1000);
    assert.ok(r.has(base + 199_999) && r.has(base + 199_000) && !r.has(base + 198_999));
  });

  it('starts empty again after clear', () => {
    const r = new RecentIds(2);
    r.add(1);
    r.add(2);
    r.clear();
    assert.equal(r.size, 0);
    r.add(3);
    r.add(4);
    r.add(5);
    assert.deepEqual(
      [3, 4, 5].map((id) => r.has(id)),
      [false, true, true],
    );
  });

  it('refuses a capacity that is not a positive whole number', () => {
    assert.throws(() => new RecentIds(0), RangeError);
    assert.throws(() => new RecentIds(1.5), RangeError);
  });
});
