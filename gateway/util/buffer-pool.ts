/**
 * Reuses large buffers (READ replies, WRITE payloads that arrive in pieces).
 * A fresh 1 MiB buffer costs page faults and kernel zeroing on every
 * request; a recycled one costs nothing. Buffers are kept by power-of-two
 * capacity, up to a bounded total, so an idle gateway holds little.
 */
export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private held = 0;

  constructor(
    /**
     * Callers that may not give a buffer back (READ replies below it go to the slab
     * allocator, short runs of records are read into plain buffers) only use the pool
     * from this size on.
     */
    readonly minSize = 128 * 1024,
    private readonly maxHeld = 64 * 1024 * 1024,
    /**
     * Pooled from this size on all the same, for the callers that do give buffers back:
     * WRITE payloads that arrive in pieces, records of a few blocks. Node's own pool stops
     * at 4 KiB, and a fresh 4 KiB payload per write request was the largest allocation
     * of a 4k random write (external memory, answered with collections).
     */
    private readonly smallSize = 4096,
  ) {}

  /** A buffer of exactly `n` bytes, backed by a pooled allocation when n >= 4 KiB. */
  acquire(n: number): Buffer {
    if (n < this.smallSize) return Buffer.allocUnsafe(n);
    const capacity = 2 ** Math.ceil(Math.log2(n));
    const list = this.free.get(capacity);
    const whole = list?.pop();
    if (whole) {
      this.held -= capacity;
      return whole.subarray(0, n);
    }
    return Buffer.allocUnsafeSlow(capacity).subarray(0, n);
  }

  /** Returns a buffer from acquire(); nothing may use it afterwards. */
  release(buf: Buffer): void {
    const capacity = buf.buffer.byteLength;
    if (buf.length < this.smallSize || buf.byteOffset !== 0 || this.held + capacity > this.maxHeld) return;
    if ((capacity & (capacity - 1)) !== 0) return;
    let list = this.free.get(capacity);
    if (!list) this.free.set(capacity, (list = []));
    list.push(Buffer.from(buf.buffer, 0, capacity));
    this.held += capacity;
  }
}

/** One pool for the process: connections come and go, the buffers stay useful. */
export const sharedBufferPool = new BufferPool();
