/**
 * Carves small reply buffers out of large slabs, as Node's own Buffer pool
 * does but for sizes up to 64 KiB (Node pools only below 4 KiB, so every 4 KiB
 * read reply would otherwise be its own ArrayBuffer). A slab is reclaimed by
 * the GC once every slice of it is gone.
 */
export class SlabAllocator {
  private slab: Buffer;
  private used = 0;

  constructor(
    private readonly slabSize = 2 * 1024 * 1024,
    private readonly maxSlice = 64 * 1024 + 64,
  ) {
    this.slab = Buffer.allocUnsafeSlow(slabSize);
  }

  alloc(n: number): Buffer {
    if (n > this.maxSlice) return Buffer.allocUnsafeSlow(n);
    if (this.used + n > this.slabSize) {
      this.slab = Buffer.allocUnsafeSlow(this.slabSize);
      this.used = 0;
    }
    const out = this.slab.subarray(this.used, this.used + n);
    this.used += (n + 7) & ~7;
    return out;
  }
}
