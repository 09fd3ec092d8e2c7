import type { DataEntry } from './layout';

/** Metamap value meaning "entry removed" (the block is a hole again). */
export const HOLE = -1;

/**
 * Index changes since the last checkpoint, in memory. Reads look here
 * before the index; a checkpoint writes a frozen overlay to the index in
 * one transaction. Reference counts travel as deltas, so a hot block costs
 * one index update per checkpoint, not one per write.
 */
export class Overlay {
  /** metaKey -> block id, ZERO_BLOCK, or HOLE. */
  readonly meta = new Map<number, number>();
  readonly newData = new Map<number, DataEntry>();
  readonly refDelta = new Map<number, number>();
  /** Blocks the compactor copied elsewhere: id -> new record location. */
  readonly moved = new Map<number, { segment: number; offset: number }>();

  get size(): number {
    return this.meta.size + this.newData.size + this.refDelta.size + this.moved.size;
  }

  addRef(id: number, delta: number): void {
    const v = (this.refDelta.get(id) ?? 0) + delta;
    if (v === 0) this.refDelta.delete(id);
    else this.refDelta.set(id, v);
  }
}
