// Records whose segment write is still in flight, by block id. A block that is
// read, compared or mirrored before its bytes reach the segment is served from
// the record in memory.
//
// One entry per segment write, not per block: the blocks of one write have
// consecutive ids (the store numbers them in one synchronous pass), so a 1 MiB
// write registers once instead of putting 256 entries into a Map that grows and
// shrinks with every request. Lookups scan the writes in flight, which the
// clients' queue depth bounds.

export interface PendingRecord {
  record: Buffer;
  written: Promise<void>;
}

export interface PendingWrite {
  readonly first: number;
  readonly count: number;
  readonly records: Buffer;
  /** Record k (block first + k) is records[starts[k], starts[k + 1]). */
  readonly starts: Uint32Array;
  readonly written: Promise<void>;
}

export class PendingRecords {
  private readonly writes = new Set<PendingWrite>();

  /** Registers the records of one write; delete() it once the write has settled. */
  add(first: number, records: Buffer, starts: Uint32Array, written: Promise<void>): PendingWrite {
    const w: PendingWrite = { first, count: starts.length - 1, records, starts, written };
    this.writes.add(w);
    return w;
  }

  /** A single record (the compactor's copies keep their block ids). */
  addOne(id: number, record: Buffer, written: Promise<void>): PendingWrite {
    return this.add(id, record, Uint32Array.of(0, record.length), written);
  }

  delete(w: PendingWrite): void {
    this.writes.delete(w);
  }

  private find(id: number): PendingWrite | undefined {
    if (this.writes.size === 0) return undefined;
    for (const w of this.writes) if (id >= w.first && id < w.first + w.count) return w;
    return undefined;
  }

  has(id: number): boolean {
    return this.find(id) !== undefined;
  }

  get(id: number): PendingRecord | undefined {
    const w = this.find(id);
    if (!w) return undefined;
    const k = id - w.first;
    return { record: w.records.subarray(w.starts[k]!, w.starts[k + 1]!), written: w.written };
  }
}
