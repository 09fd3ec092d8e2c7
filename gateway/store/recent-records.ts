// The latest records the store wrote, kept in memory for mirrors: a mirror asks
// for a new block's bytes a round trip after the write, and reading them back from
// the segment (a thread-pool pread and a full decode check) added that much again
// to every sync write.
//
// A ring of fixed slots in one buffer allocated once: the write path copies each
// record in, and nothing is allocated per block. What leaves is a view of its slot,
// which the next add() may reuse: a caller copies it before anything else is written
// (captureRange copies a whole range's into one buffer).

import { NumMap } from './num-map';

export class RecentRecords {
  private readonly slab: Buffer;
  private readonly lengths: Uint32Array;
  /** Slot -> block id, -1 when empty. */
  private readonly ids: Float64Array;
  /** Block id -> slot. */
  private readonly slots: NumMap;
  private next = 0;

  constructor(
    private readonly capacity: number,
    private readonly slotBytes: number,
  ) {
    this.slab = Buffer.allocUnsafeSlow(capacity * slotBytes);
    this.lengths = new Uint32Array(capacity);
    this.ids = new Float64Array(capacity).fill(-1);
    this.slots = new NumMap(capacity * 2);
  }

  /** Keeps a copy of the record at src[at..at+length] (all of src by default), evicting the oldest one kept. */
  add(id: number, src: Buffer, at = 0, length = src.length - at): void {
    if (length > this.slotBytes) return;
    const earlier = this.slots.get(id);
    if (earlier !== undefined) this.ids[earlier] = -1;
    const slot = this.next;
    this.next = (slot + 1) % this.capacity;
    const evicted = this.ids[slot]!;
    if (evicted >= 0) this.slots.delete(evicted);
    src.copy(this.slab, slot * this.slotBytes, at, at + length);
    this.lengths[slot] = length;
    this.ids[slot] = id;
    this.slots.set(id, slot);
  }

  /** The record kept for `id` (a view of its slot, valid until the next add), if it is still kept. */
  view(id: number): Buffer | undefined {
    const slot = this.slots.get(id);
    if (slot === undefined) return undefined;
    const at = slot * this.slotBytes;
    return this.slab.subarray(at, at + this.lengths[slot]!);
  }
}
