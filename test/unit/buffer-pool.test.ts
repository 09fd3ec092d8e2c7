import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { BufferPool } from '../../gateway/util/buffer-pool';

describe('buffer pool', () => {
  it('hands a released 4 KiB buffer out again', () => {
    const pool = new BufferPool();
    const a = pool.acquire(4096);
    pool.release(a);
    const b = pool.acquire(4096);
    assert.equal(b.buffer, a.buffer);
  });

  it('serves a size from the next power of two, exactly as long as asked', () => {
    const pool = new BufferPool();
    const a = pool.acquire(5000);
    assert.equal(a.length, 5000);
    assert.equal(a.buffer.byteLength, 8192);
    pool.release(a);
    assert.equal(pool.acquire(6000).buffer, a.buffer);
  });

  it('does not take back a buffer under 4 KiB', () => {
    // Room for 8 KiB: had the 2 KiB buffer been kept, the 8 KiB one would not fit.
    const pool = new BufferPool(128 * 1024, 8192);
    const big = pool.acquire(8192);
    pool.release(Buffer.allocUnsafeSlow(2048));
    pool.release(big);
    assert.equal(pool.acquire(8192).buffer, big.buffer);
  });

  it('does not take back a view into another buffer', () => {
    const pool = new BufferPool();
    const whole = pool.acquire(8192);
    pool.release(whole.subarray(4096));
    assert.notEqual(pool.acquire(8192).buffer, whole.buffer);
  });

  it('keeps no more than its limit', () => {
    const pool = new BufferPool(128 * 1024, 8192);
    const a = pool.acquire(8192);
    const b = pool.acquire(8192);
    pool.release(a);
    pool.release(b); // over the 8 KiB held: dropped
    assert.equal(pool.acquire(8192).buffer, a.buffer);
    assert.notEqual(pool.acquire(8192).buffer, b.buffer);
  });
});
