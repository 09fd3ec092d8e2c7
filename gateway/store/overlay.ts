import type { DataEntry } from './layout';
import { NumMap } from './num-map';

/** Metamap value meaning "entry removed" (the block is a hole again). */
export const HOLE = -1;

/** What a new block's datamap entry will be, before the checkpoint writes it. */
export interface NewEntry {
  segment: number;
  offset: number;
  storedLength: number;
  flags: number;
  hash: Buffer;
}

/**
 * The blocks stored since the last checkpoint, by id: columns in typed arrays that
 * survive clear(), so a checkpoint's worth of new blocks allocates nothing but the
 * hash buffers the write path made anyway.
 */
export class NewData {
  /** id -> row */
  private readonly rows = new NumMap(1024);
  private segment = new Uint32Array(1024);
  private offset = new Uint32Array(1024);
  private length = new Uint32Array(1024);
  private flags = new Uint16Array(1024);
  private readonly hashes: Buffer[] = [];
  private ids = new Float64Array(1024);
  private n = 0;

  get size(): number {
    return this.rows.size;
  }

  has(id: number): boolean {
    return this.rows.has(id);
  }

  set(id: number, e: NewEntry): void {
    let row = this.rows.get(id);
    if (row === undefined) {
      row = this.n++;
      if (row === this.segment.length) this.grow();
      this.rows.set(id, row);
      this.ids[row] = id;
    }
    this.segment[row] = e.segment;
    this.offset[row] = e.offset;
    this.length[row] = e.storedLength;
    this.flags[row] = e.flags;
    this.hashes[row] = e.hash;
  }

  /** The entry as the datamap will hold it (no references yet: those travel as deltas). */
  get(id: number): DataEntry | undefined {
    const row = this.rows.get(id);
    return row === undefined ? undefined : this.entry(row);
  }

  hash(id: number): Buffer | undefined {
    const row = this.rows.get(id);
    return row === undefined ? undefined : this.hashes[row];
  }

  /** Calls fn for every new block, oldest first; the table must not change meanwhile. */
  forEach(fn: (id: number, e: DataEntry) => void): void {
    for (let row = 0; row < this.n; row++) fn(this.ids[row]!, this.entry(row));
  }

  /** Ids of the new blocks, oldest first. */
  idList(): Float64Array {
    return this.ids.subarray(0, this.n);
  }

  clear(): void {
    this.rows.clear();
    // hashes keeps its length (and its old buffers until rows overwrite them): shrinking
    // and regrowing it every checkpoint would reallocate its backing store each time.
    this.n = 0;
  }

  private entry(row: number): DataEntry {
    return {
      segment: this.segment[row]!,
      offset: this.offset[row]!,
      storedLength: this.length[row]!,
      flags: this.flags[row]!,
      refcount: 0,
      hash: this.hashes[row]!,
    };
  }

  private grow(): void {
    const cap = this.segment.length * 2;
    const more = <T extends Uint32Array | Uint16Array | Float64Array>(a: T, make: (n: number) => T): T => {
      const b = make(cap);
      b.set(a);
      return b;
    };
    this.segment = more(this.segment, (n) => new Uint32Array(n));
    this.offset = more(this.offset, (n) => new Uint32Array(n));
    this.length = more(this.length, (n) => new Uint32Array(n));
    this.flags = more(this.flags, (n) => new Uint16Array(n));
    this.ids = more(this.ids, (n) => new Float64Array(n));
  }
}

/**
 * Index changes since the last checkpoint, in memory. Reads look here
 * before the index; a checkpoint writes a frozen overlay to the index in
 * one transaction. Reference counts travel as deltas, so a hot block costs
 * one index update per checkpoint, not one per write. The store keeps two
 * overlays and swaps them: their tables are reused, never reallocated.
 */
export class Overlay {
  /** metaKey -> block id, ZERO_BLOCK, or HOLE. */
  readonly meta = new NumMap(1024);
  readonly newData = new NewData();
  readonly refDelta = new NumMap(1024);
  /** Blocks the compactor copied elsewhere: id -> new record location. */
  readonly moved = new Map<number, { segment: number; offset: number }>();

  get size(): number {
    return this.meta.size + this.newData.size + this.refDelta.size + this.moved.size;
  }

  addRef(id: number, delta: number): void {
    this.refDelta.add(id, delta);
  }

  clear(): void {
    this.meta.clear();
    this.newData.clear();
    this.refDelta.clear();
    this.moved.clear();
  }
}
