// A hash map from numbers to numbers on typed arrays, for the store's overlays.
//
// A checkpoint used to start a fresh JS Map for every overlay: each grew through a
// dozen rehashes to tens of thousands of entries, and past 128 KiB V8 puts a table
// in freshly mapped pages. On this project's VMs a fresh page fault costs about
// 16 µs, so the maps' growth alone cost more CPU than the LMDB commit. These
// tables keep their arrays across clear() and cost no allocation in steady state.
//
// Keys are integers up to 2^53 (block ids, metamap keys); values any double.
// Open addressing with linear probing and backward-shift deletion (no tombstones).

const MIN_CAPACITY = 64;
/** A table this many slots or larger is shrunk back by clear(): one huge overlay must not pin its memory. */
const SHRINK_ABOVE = 1 << 20;
const MAX_LOAD = 0.6;

const scratch = new Float64Array(1);
const scratchWords = new Uint32Array(scratch.buffer);

function hashOf(key: number): number {
  scratch[0] = key;
  // A small integer's double has all its bits in the high word: mix both.
  let h = scratchWords[0]! ^ Math.imul(scratchWords[1]!, 0x85ebca6b);
  h ^= h >>> 16;
  h = Math.imul(h, 0x7feb352d);
  h ^= h >>> 15;
  h = Math.imul(h, 0x846ca68b);
  return h ^ (h >>> 16);
}

export class NumMap {
  private keys: Float64Array;
  private vals: Float64Array;
  private used: Uint8Array;
  private mask: number;
  private count = 0;

  constructor(capacity = MIN_CAPACITY) {
    const cap = NumMap.capacityFor(capacity);
    this.keys = new Float64Array(cap);
    this.vals = new Float64Array(cap);
    this.used = new Uint8Array(cap);
    this.mask = cap - 1;
  }

  private static capacityFor(entries: number): number {
    let cap = MIN_CAPACITY;
    while (cap * MAX_LOAD < entries) cap *= 2;
    return cap;
  }

  get size(): number {
    return this.count;
  }

  /** The slot holding `key`, or -1. */
  private find(key: number): number {
    const { keys, used, mask } = this;
    for (let i = hashOf(key) & mask; used[i] === 1; i = (i + 1) & mask) if (keys[i] === key) return i;
    return -1;
  }

  get(key: number): number | undefined {
    const i = this.find(key);
    return i < 0 ? undefined : this.vals[i];
  }

  has(key: number): boolean {
    return this.find(key) >= 0;
  }

  set(key: number, value: number): void {
    const { keys, used, mask } = this;
    let i = hashOf(key) & mask;
    for (; used[i] === 1; i = (i + 1) & mask) {
      if (keys[i] === key) {
        this.vals[i] = value;
        return;
      }
    }
    keys[i] = key;
    this.vals[i] = value;
    used[i] = 1;
    if (++this.count > this.keys.length * MAX_LOAD) this.resize(this.keys.length * 2);
  }

  /** Adds `delta` to the key's value (0 when absent), deleting it when the sum is 0. */
  add(key: number, delta: number): void {
    const i = this.find(key);
    if (i < 0) {
      if (delta !== 0) this.set(key, delta);
      return;
    }
    const v = this.vals[i]! + delta;
    if (v === 0) this.deleteSlot(i);
    else this.vals[i] = v;
  }

  delete(key: number): boolean {
    const i = this.find(key);
    if (i < 0) return false;
    this.deleteSlot(i);
    return true;
  }

  /** Empties the slot, then moves later entries of its probe run back so no lookup stops short. */
  private deleteSlot(i: number): void {
    const { keys, vals, used, mask } = this;
    let hole = i;
    for (let j = (hole + 1) & mask; used[j] === 1; j = (j + 1) & mask) {
      const home = hashOf(keys[j]!) & mask;
      // Moves back unless its home lies cyclically in (hole, j].
      const stays = hole <= j ? home > hole && home <= j : home > hole || home <= j;
      if (stays) continue;
      keys[hole] = keys[j]!;
      vals[hole] = vals[j]!;
      hole = j;
    }
    used[hole] = 0;
    this.count--;
  }

  clear(): void {
    if (this.count === 0) return;
    if (this.keys.length >= SHRINK_ABOVE) {
      const cap = NumMap.capacityFor(MIN_CAPACITY);
      this.keys = new Float64Array(cap);
      this.vals = new Float64Array(cap);
      this.used = new Uint8Array(cap);
      this.mask = cap - 1;
    } else {
      this.used.fill(0);
    }
    this.count = 0;
  }

  /** Calls fn for every entry; the map must not change meanwhile. */
  forEach(fn: (value: number, key: number) => void): void {
    const { keys, vals, used } = this;
    for (let i = 0; i < used.length; i++) if (used[i] === 1) fn(vals[i]!, keys[i]!);
  }

  *keysOf(): IterableIterator<number> {
    const { keys, used } = this;
    for (let i = 0; i < used.length; i++) if (used[i] === 1) yield keys[i]!;
  }

  private resize(cap: number): void {
    const { keys, vals, used } = this;
    this.keys = new Float64Array(cap);
    this.vals = new Float64Array(cap);
    this.used = new Uint8Array(cap);
    this.mask = cap - 1;
    this.count = 0;
    for (let i = 0; i < used.length; i++) if (used[i] === 1) this.set(keys[i]!, vals[i]!);
  }
}
