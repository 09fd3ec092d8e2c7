import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { ChunkActivity, maySettle } from '../../gateway/replication/settle';

/** One chunk (0), last touched at `touched`, with nothing pending unless `set` says so. */
function chunk(
  touched: number,
  set: (a: ChunkActivity & { dirtySet: Set<number> }) => void = () => undefined,
) {
  const dirtySet = new Set<number>();
  const a = {
    busy: new Uint8Array(1),
    active: new Uint32Array(1),
    touched: Float64Array.of(touched),
    dirty: { has: (c: number) => dirtySet.has(c) },
    dirtySet,
  };
  set(a);
  return a;
}

// Times in ms: cool before 100, durable as of 200.
const COOL = 100;
const DURABLE = 200;

describe('when an activity log may forget a chunk', () => {
  it('forgets a chunk left alone long enough and durable here', () => {
    assert.equal(maySettle(0, chunk(50), COOL, DURABLE), true);
  });

  it('keeps a chunk touched lately, though durable', () => {
    assert.equal(maySettle(0, chunk(150), COOL, 1000), false);
  });

  it('keeps a cool chunk whose last change is not yet committed here', () => {
    assert.equal(maySettle(0, chunk(50), COOL, 50), false);
    assert.equal(maySettle(0, chunk(50), COOL, 40), false);
  });

  it('keeps a chunk with changes under way, in a batch, or owed by the sync', () => {
    const settles = (a: ChunkActivity): boolean => maySettle(0, a, COOL, DURABLE);
    assert.equal(settles(chunk(50, (a) => (a.active[0] = 1))), false);
    assert.equal(settles(chunk(50, (a) => (a.busy[0] = 1))), false);
    assert.equal(settles(chunk(50, (a) => a.dirtySet.add(0))), false);
  });
});
