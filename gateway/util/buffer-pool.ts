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
    /** Smaller requests are not pooled (the slab allocator serves them). */
    readonly minSize = 128 * 1024,
    private readonly maxHeld = 64 * 1024 * 1024,
  ) {}

  /** A buffer of exactly `n` bytes, backed by a pooled allocation when n >= minSize. */
  acquire(n: number): Buffer {
    if (n < this.minSize) return Buffer.allocUnsafe(n);
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
    if (buf.length < this.minSize || buf.byteOffset !== 0 || this.held + capacity > this.maxHeld) return;
    if ((capacity & (capacity - 1)) !== 0) return;
    let list = this.free.get(capacity);
    if (!list) this.free.set(capacity, (list = []));
    list.push(Buffer.from(buf.buffer, 0, capacity));
    this.held += capacity;
  }
}

/** One pool for the process: connections come and go, the buffers stay useful. */
export const sharedBufferPool = new BufferPool();
