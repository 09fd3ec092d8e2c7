/**
 * Bytes received but not yet parsed, kept as the chunks they arrived in.
 * Taking bytes that sit inside one chunk is a zero-copy subarray; only a
 * message that straddles chunks is copied.
 */
export class ByteQueue {
  private chunks: Buffer[] = [];
  private head = 0; // offset into chunks[0]
  private total = 0;

  get length(): number {
    return this.total;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /**
   * The next `n` bytes without consuming them, as one contiguous buffer.
   * Requires `n <= length`.
   */
  peek(n: number, alloc: (n: number) => Buffer = Buffer.allocUnsafe): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    if (first.length - this.head >= n) return first.subarray(this.head, this.head + n);
    const out = alloc(n);
    let copied = 0;
    let at = this.head;
    for (const c of this.chunks) {
      copied += c.copy(out, copied, at, Math.min(c.length, at + n - copied));
      at = 0;
      if (copied === n) break;
    }
    return out;
  }

  /** Whether the next `n` bytes sit in one chunk (take() would not copy). */
  contiguous(n: number): boolean {
    return n === 0 || (this.chunks.length > 0 && this.chunks[0]!.length - this.head >= n);
  }

  /**
   * Consumes `n` bytes and returns them contiguously. Requires `n <= length`.
   * Bytes that straddle chunks are copied into `alloc(n)`.
   */
  take(n: number, alloc?: (n: number) => Buffer): Buffer {
    const out = this.peek(n, alloc);
    this.skip(n);
    return out;
  }

  /** Consumes `n` bytes (n <= length) by copying them into `out` at `at`; returns n. */
  copyTo(out: Buffer, at: number, n: number): number {
    let copied = 0;
    let from = this.head;
    for (const c of this.chunks) {
      if (copied === n) break;
      copied += c.copy(out, at + copied, from, Math.min(c.length, from + n - copied));
      from = 0;
    }
    this.skip(n);
    return n;
  }

  /** Drops up to `n` bytes; returns how many were dropped. */
  skip(n: number): number {
    let left = Math.min(n, this.total);
    const dropped = left;
    while (left > 0) {
      const first = this.chunks[0]!;
      const avail = first.length - this.head;
      if (avail > left) {
        this.head += left;
        break;
      }
      left -= avail;
      this.chunks.shift();
      this.head = 0;
    }
    this.total -= dropped;
    return dropped;
  }

  /** Everything left, emptying the queue (for handing over to the next phase). */
  drain(): Buffer[] {
    const out = this.chunks.map((c, i) => (i === 0 ? c.subarray(this.head) : c));
    this.chunks = [];
    this.head = 0;
    this.total = 0;
    return out;
  }
}
