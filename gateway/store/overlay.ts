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
 * survive clear(), so a checkpoint's worth of new blocks allocates nothing. Hashes
 * too are copied into a column: a Buffer per block kept until the checkpoint lived
 * long enough to be promoted, and V8's old space grew and shrank with every one.
 */
export class NewData {
  /** id -> row */
  private readonly rows = new NumMap(1024);
  private segment = new Uint32Array(1024);
  private offset = new Uint32Array(1024);
  private length = new Uint32Array(1024);
  private flags = new Uint16Array(1024);
  private hashes = Buffer.alloc(1024 * 16);
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
    e.hash.copy(this.hashes, row * 16, 0, 16);
  }

  /** The entry as the datamap will hold it (no references yet: those travel as deltas). */
  get(id: number): DataEntry | undefined {
    const row = this.rows.get(id);
    return row === undefined ? undefined : this.entry(row, Buffer.from(this.hashView(row)));
  }

  /** A copy of the block's hash. */
  hash(id: number): Buffer | undefined {
    const row = this.rows.get(id);
    return row === undefined ? undefined : Buffer.from(this.hashView(row));
  }

  private hashView(row: number): Buffer {
    return this.hashes.subarray(row * 16, row * 16 + 16);
  }

  /**
   * Calls fn for every new block, oldest first; the table must not change meanwhile.
   * The entry's hash is a view of the table, valid only during the call.
   */
  forEach(fn: (id: number, e: DataEntry) => void): void {
    for (let row = 0; row < this.n; row++) fn(this.ids[row]!, this.entry(row, this.hashView(row)));
  }

  /**
   * The table's columns, row r for the r-th new block (oldest first), for a reader that
   * copies them all at once (a checkpoint's tables): views, valid until the next change.
   */
  columns(): {
    n: number;
    ids: Float64Array;
    segment: Uint32Array;
    offset: Uint32Array;
    length: Uint32Array;
    flags: Uint16Array;
    /** Four words per row. */
    hashWords: Uint32Array;
  } {
    const { n, ids, segment, offset, length, flags, hashes } = this;
    // Buffer.alloc of this size is never a slice of the shared pool: word-aligned.
    const hashWords = new Uint32Array(hashes.buffer, hashes.byteOffset, hashes.length / 4);
    return { n, ids, segment, offset, length, flags, hashWords };
  }

  /** Ids of the new blocks, oldest first. */
  idList(): Float64Array {
    return this.ids.subarray(0, this.n);
  }

  clear(): void {
    this.rows.clear();
    this.n = 0;
  }

  private entry(row: number, hash: Buffer): DataEntry {
    return {
      segment: this.segment[row]!,
      offset: this.offset[row]!,
      storedLength: this.length[row]!,
      flags: this.flags[row]!,
      refcount: 0,
      hash,
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
    const hashes = Buffer.alloc(cap * 16);
    this.hashes.copy(hashes);
    this.hashes = hashes;
  }
}

/**
 * Where a block's record went: the compactor's copy of it (the same record), or a new one
 * a mend wrote in place of a damaged copy, with its own stored length and record flags
 * (the entry's DAMAGED flag goes).
 */
export interface MovedRecord {
  segment: number;
  offset: number;
  storedLength?: number;
  flags?: number;
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
  /** Blocks whose record is now elsewhere: id -> new record location. */
  readonly moved = new Map<number, MovedRecord>();
  /** Blocks a scrub found damaged, to be flagged so in the datamap (EntryFlag.DAMAGED). */
  readonly damaged = new Set<number>();

  get size(): number {
    return this.meta.size + this.newData.size + this.refDelta.size + this.moved.size + this.damaged.size;
  }

  addRef(id: number, delta: number): void {
    this.refDelta.add(id, delta);
  }

  clear(): void {
    this.meta.clear();
    this.newData.clear();
    this.refDelta.clear();
    this.moved.clear();
    this.damaged.clear();
  }
}
