// The metamap in memory, a page of 1024 blocks at a time, each block with the
// last known place of its record. A read then costs two typed-array loads
// where it cost two LMDB B-tree walks (perf put those at 15% of a 4 KiB random
// read), and a write finds the mapping it replaces without one.
//
// The store keeps pages exact: it loads a page from the index and both
// overlays within one tick, and every metamap change goes through it. A
// record's place is only a hint, filled by a read that found the record where
// the datamap said or written by the write that made it; records never change in place and segment numbers are
// never reused while the store is open, so a hint stays right until its
// segment is deleted, and the read checks the record's header anyway.

import { HOLE } from './overlay';

export const META_PAGE = 1024;
/** A record's place packs segment and offset; segments are at most 2^28 bytes. */
const OFFSET_SPAN = 2 ** 28;
/** Bytes a page costs: ids and places (8 bytes each), stored lengths (2). */
export const META_PAGE_BYTES = META_PAGE * 18;

export class MetaPage {
  /** Block id per block: HOLE, ZERO_BLOCK or a stored block. */
  readonly ids = new Float64Array(META_PAGE).fill(HOLE);
  /** Known record place per block, 0 when unknown. */
  readonly places = new Float64Array(META_PAGE);
  /** Stored (payload) length of the record at the known place. */
  readonly lengths = new Uint16Array(META_PAGE);
  /** Touched since the evictor last passed (second chance). */
  referenced = true;
}

export function packPlace(segment: number, offset: number): number {
  return segment * OFFSET_SPAN + offset;
}

export function placeSegment(place: number): number {
  return Math.floor(place / OFFSET_SPAN);
}

export function placeOffset(place: number): number {
  return place % OFFSET_SPAN;
}

/** The page key of a metamap key (metaKey packs volume and block; 2^40 is a multiple of META_PAGE). */
export function pageKey(key: number): number {
  return Math.floor(key / META_PAGE);
}

/**
 * The pages, bounded by a byte budget and evicted with a second chance (CLOCK):
 * a page read since the evictor last passed it goes to the back instead.
 */
export class MetaCache {
  private readonly pages = new Map<number, MetaPage>();
  private readonly maxPages: number;

  constructor(budgetBytes: number) {
    this.maxPages = Math.max(0, Math.floor(budgetBytes / META_PAGE_BYTES));
  }

  get enabled(): boolean {
    return this.maxPages > 0;
  }

  get size(): number {
    return this.pages.size;
  }

  get bytes(): number {
    return this.pages.size * META_PAGE_BYTES;
  }

  get(pk: number): MetaPage | undefined {
    const page = this.pages.get(pk);
    if (page) page.referenced = true;
    return page;
  }

  add(pk: number, page: MetaPage): void {
    if (this.maxPages === 0) return;
    while (this.pages.size >= this.maxPages) this.evictOne();
    this.pages.set(pk, page);
  }

  /** A new mapping for a block whose page is cached; its place is unknown until a read finds it. */
  set(key: number, id: number): void {
    const page = this.pages.get(pageKey(key));
    if (!page) return;
    const i = key % META_PAGE;
    page.ids[i] = id;
    page.places[i] = 0;
  }

  /**
   * The place of a record just written for block `key`, if its page is cached and still
   * maps the block to `id`. A new record's header carries the hash the datamap gets, so
   * the place is as good a hint as one a read found.
   */
  notePlace(key: number, id: number, segment: number, offset: number, storedLength: number): void {
    const page = this.pages.get(pageKey(key));
    if (!page) return;
    const i = key % META_PAGE;
    if (page.ids[i] !== id) return;
    page.places[i] = packPlace(segment, offset);
    page.lengths[i] = storedLength;
  }

  /** Drops the pages of a deleted volume (volume ids are not reused, but the memory is). */
  dropVolume(volume: number): void {
    const first = volume * 2 ** 30;
    for (const pk of [...this.pages.keys()]) {
      if (pk >= first && pk < first + 2 ** 30) this.pages.delete(pk);
    }
  }

  clear(): void {
    this.pages.clear();
  }

  private evictOne(): void {
    // Bounded: one pass clears every reference bit, so the second pass evicts.
    for (let tries = 2 * this.pages.size + 1; tries > 0; tries--) {
      const first = this.pages.entries().next();
      if (first.done) return;
      const [pk, page] = first.value;
      this.pages.delete(pk);
      if (!page.referenced) return;
      page.referenced = false;
      this.pages.set(pk, page);
    }
  }
}
