import { NumMap } from '../store/num-map';

/**
 * The last `capacity` ids added, for "have I lately done this for id X?". The oldest
 * is forgotten when a new one arrives. A ring rather than a Set's insertion order:
 * taking a Set's first entry walks past every entry deleted before it, and deleting
 * from the front of a busy Set made that walk the mirror's biggest cost.
 */
export class RecentIds {
  /** A typed-array table: ids past 2^31 would each be a heap number in a Set. */
  private readonly members: NumMap;
  private readonly ring: Float64Array;
  private next = 0;

  constructor(readonly capacity: number) {
    if (!Number.isInteger(capacity) || capacity < 1) throw new RangeError(`capacity ${capacity}`);
    this.ring = new Float64Array(capacity);
    this.members = new NumMap(capacity);
  }

  has(id: number): boolean {
    return this.members.has(id);
  }

  get size(): number {
    return this.members.size;
  }

  /** Adds `id` (no effect if present), forgetting the oldest when full. */
  add(id: number): void {
    if (this.members.has(id)) return;
    if (this.members.size === this.capacity) this.members.delete(this.ring[this.next]!);
    this.ring[this.next] = id;
    this.next = this.next + 1 === this.capacity ? 0 : this.next + 1;
    this.members.set(id, 1);
  }

  clear(): void {
    this.members.clear();
    this.next = 0;
  }
}
