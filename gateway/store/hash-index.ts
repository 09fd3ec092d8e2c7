// The content-hash index in memory: the first 8 bytes of a block's keyed hash
// to its block id, in typed arrays (16 bytes a slot, open addressing with
// linear probing). It is rebuilt from the datamap when the store opens, so it
// costs no index writes: an LMDB tree keyed by random hashes made every
// checkpoint copy most of its leaf pages (VDO keeps its dedup index apart from
// the block map for the same reason). A hit is a candidate only: callers check
// the datamap's full hash (and the write path compares the bytes).

const EMPTY = 0; // block ids start at 1
const MAX_LOAD = 0.7;

export class HashIndex {
  private lo: Uint32Array;
  private hi: Uint32Array;
  private ids: Float64Array;
  private mask: number;
  private count = 0;

  constructor(capacity = 1 << 16) {
    let n = 1 << 4;
    while (n < capacity) n *= 2;
    this.lo = new Uint32Array(n);
    this.hi = new Uint32Array(n);
    this.ids = new Float64Array(n);
    this.mask = n - 1;
  }

  get size(): number {
    return this.count;
  }

  /** Bytes of memory the index holds. */
  get bytes(): number {
    return this.ids.length * 16;
  }

  /** The block filed under `hash`'s first 8 bytes, if any. */
  get(hash: Buffer): number | undefined {
    const lo = hash.readUInt32LE(0);
    const hi = hash.readUInt32LE(4);
    for (let i = lo & this.mask; ; i = (i + 1) & this.mask) {
      const id = this.ids[i]!;
      if (id === EMPTY) return undefined;
      if (this.lo[i] === lo && this.hi[i] === hi) return id;
    }
  }

  /** Files `id` under `hash` (replacing what was filed under the same 8 bytes). */
  set(hash: Buffer, id: number): void {
    this.put(hash.readUInt32LE(0), hash.readUInt32LE(4), id, true);
  }

  /** Files `id` unless something is already filed under `hash` (the oldest block wins a rebuild). */
  add(hash: Buffer, id: number): void {
    this.put(hash.readUInt32LE(0), hash.readUInt32LE(4), id, false);
  }

  /** Removes `hash`'s entry if it is `id`'s (a newer block may have taken the slot). */
  delete(hash: Buffer, id: number): void {
    this.deleteKey(hash.readUInt32LE(0), hash.readUInt32LE(4), id);
  }

  /** delete() by the hash's first 8 bytes as two little-endian words. */
  deleteKey(lo: number, hi: number, id: number): void {
    let i = lo & this.mask;
    for (; ; i = (i + 1) & this.mask) {
      const at = this.ids[i]!;
      if (at === EMPTY) return;
      if (this.lo[i] === lo && this.hi[i] === hi) {
        if (at !== id) return;
        break;
      }
    }
    // Backward-shift deletion: later entries of the probe run move up into the gap.
    let gap = i;
    for (let j = (gap + 1) & this.mask; this.ids[j] !== EMPTY; j = (j + 1) & this.mask) {
      const home = this.lo[j]! & this.mask;
      // Entry j may fill the gap if its home slot is not within (gap, j].
      const between = gap <= j ? home > gap && home <= j : home > gap || home <= j;
      if (between) continue;
      this.lo[gap] = this.lo[j]!;
      this.hi[gap] = this.hi[j]!;
      this.ids[gap] = this.ids[j]!;
      gap = j;
    }
    this.ids[gap] = EMPTY;
    this.count--;
  }

  /**
   * Removes the entries of the ids `gone` holds, whatever their hashes: for blocks a
   * commit deleted when their hashes were not reported (a commit whose reply was
   * lost). Walks the whole table; a rare path.
   */
  deleteIds(gone: { has(id: number): boolean }): void {
    const found: Array<[number, number, number]> = [];
    for (let i = 0; i < this.ids.length; i++) {
      const id = this.ids[i]!;
      if (id !== EMPTY && gone.has(id)) found.push([this.lo[i]!, this.hi[i]!, id]);
    }
    const key = Buffer.allocUnsafe(8);
    for (const [lo, hi, id] of found) {
      key.writeUInt32LE(lo, 0);
      key.writeUInt32LE(hi, 4);
      this.delete(key, id);
    }
  }

  private put(lo: number, hi: number, id: number, replace: boolean): void {
    if ((this.count + 1) / this.ids.length > MAX_LOAD) this.grow();
    for (let i = lo & this.mask; ; i = (i + 1) & this.mask) {
      const at = this.ids[i]!;
      if (at === EMPTY) {
        this.lo[i] = lo;
        this.hi[i] = hi;
        this.ids[i] = id;
        this.count++;
        return;
      }
      if (this.lo[i] === lo && this.hi[i] === hi) {
        if (replace) this.ids[i] = id;
        return;
      }
    }
  }

  private grow(): void {
    const { lo, hi, ids } = this;
    const n = ids.length * 2;
    this.lo = new Uint32Array(n);
    this.hi = new Uint32Array(n);
    this.ids = new Float64Array(n);
    this.mask = n - 1;
    this.count = 0;
    for (let i = 0; i < ids.length; i++) if (ids[i] !== EMPTY) this.put(lo[i]!, hi[i]!, ids[i]!, false);
  }
}
