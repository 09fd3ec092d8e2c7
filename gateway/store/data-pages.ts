// The datamap as LMDB holds it: the entries of PAGE_ENTRIES consecutive block
// ids share one value (a page), keyed by id / PAGE_ENTRIES. Ids are handed out
// in write order, so a checkpoint that stores or frees a run of blocks touches
// one key per run instead of one per 4 KiB block. Every lmdb-js operation costs
// 1-1.5 us here, and with a key per block a 1 MiB overwrite cost the index
// writer three of them per block (a put, and a get and a remove for the block
// it replaced): 2 ms of CPU per MB, the bottleneck of sequential writes.
//
// A page is a 32-bit presence mask, then PAGE_ENTRIES slots of DATA_ENTRY bytes
// (layout.ts's entry encoding); an absent slot's bytes mean nothing. At 32
// slots a page (1156 bytes) stays inline in LMDB's 4 KiB pages: values over
// about 2 KiB go to overflow pages, copied whole on every change.

import type { Database, RootDatabase } from 'lmdb';
import { foldIntoPages } from './index-db';
import { DATA_ENTRY, decodeId, encodeIdInto } from './layout';

export const PAGE_ENTRIES = 32;
const MASK_BYTES = 4;
export const DATA_PAGE_BYTES = MASK_BYTES + PAGE_ENTRIES * DATA_ENTRY;

/** A datamap page that is not one (its length is wrong): its blocks cannot be found. */
export class DataPageError extends Error {
  readonly code = 'ERR_DATA_PAGE';
}

export function dataPageNumber(id: number): number {
  return Math.floor(id / PAGE_ENTRIES);
}

/** The key of the page holding block `id`'s entry, into an 8-byte buffer. */
export function dataPageKeyInto(id: number, b: Buffer): Buffer {
  return encodeIdInto(dataPageNumber(id), b);
}

function checkPage(page: Buffer, pageNumber: number): void {
  if (page.length !== DATA_PAGE_BYTES)
    throw new DataPageError(`datamap page ${pageNumber} holds ${page.length} bytes, not ${DATA_PAGE_BYTES}`);
}

/** Where block `id`'s entry starts in its page, or -1 when the page has none for it. */
export function entryOffset(page: Buffer, id: number): number {
  checkPage(page, dataPageNumber(id));
  const slot = id % PAGE_ENTRIES;
  return (page.readUInt32BE(0) >>> slot) & 1 ? MASK_BYTES + slot * DATA_ENTRY : -1;
}

/** Marks block `id`'s slot used (returning where its entry goes) or free (returning -1). */
export function setPresent(page: Buffer, id: number, present: boolean): number {
  const slot = id % PAGE_ENTRIES;
  const mask = page.readUInt32BE(0);
  page.writeUInt32BE((present ? mask | (1 << slot) : mask & ~(1 << slot)) >>> 0, 0);
  return present ? MASK_BYTES + slot * DATA_ENTRY : -1;
}

export function isEmptyPage(page: Buffer): boolean {
  return page.readUInt32BE(0) === 0;
}

/** A page with no entries, to fill. */
export function emptyPage(): Buffer {
  return Buffer.alloc(DATA_PAGE_BYTES);
}

/**
 * Copies a page as LMDB returned it into `into` (DATA_PAGE_BYTES), once checked.
 * getBinaryFast's answer is a view into lmdb-js's shared buffer that only claims the
 * value's length, so Buffer.copy and Buffer.from cannot take it; a typed view can.
 */
export function readPageInto(value: Buffer, pageNumber: number, into: Buffer): Buffer {
  checkPage(value, pageNumber);
  into.set(new Uint8Array(value.buffer, value.byteOffset, DATA_PAGE_BYTES));
  return into;
}

/**
 * Every datamap entry: `entry` is its DATA_ENTRY bytes (a view, valid until the next
 * step). Rows of a store not yet converted come first, then the pages, each in id
 * order. A page (or row) that is not one is reported to `bad` and skipped.
 */
export function* dataEntries(
  trees: { data: Database<Buffer, Buffer> | undefined; legacyData: Database<Buffer, Buffer> | undefined },
  bad: (err: DataPageError) => void,
): Generator<{ id: number; entry: Buffer }> {
  for (const { key, value } of trees.legacyData?.getRange({}) ?? []) {
    const id = decodeId(key as Buffer);
    const entry = value as Buffer;
    if (entry.length === DATA_ENTRY) yield { id, entry };
    else bad(new DataPageError(`block ${id}: datamap entry of ${entry.length} bytes`));
  }
  for (const { key, value } of trees.data?.getRange({}) ?? []) {
    const first = decodeId(key as Buffer) * PAGE_ENTRIES;
    const page = value as Buffer;
    try {
      checkPage(page, first / PAGE_ENTRIES);
    } catch (err) {
      bad(err as DataPageError);
      continue;
    }
    const mask = page.readUInt32BE(0);
    for (let slot = 0; slot < PAGE_ENTRIES; slot++) {
      if (((mask >>> slot) & 1) === 0) continue;
      const at = MASK_BYTES + slot * DATA_ENTRY;
      yield { id: first + slot, entry: page.subarray(at, at + DATA_ENTRY) };
    }
  }
}

/**
 * Moves a datamap kept an entry per block id (stores written before pages) into
 * pages (foldIntoPages). A row of the wrong length stops it: the store is left as it
 * was, for fsck to report. Returns the entries moved.
 */
export function convertLegacyRows(
  env: RootDatabase,
  legacy: Database<Buffer, Buffer>,
  pages: Database<Buffer, Buffer>,
): number {
  return foldIntoPages(env, legacy, pages, {
    keyBytes: 8,
    pageKeyInto(key, entry, into) {
      const id = decodeId(key);
      if (entry.length !== DATA_ENTRY)
        throw new DataPageError(`block ${id}: datamap entry of ${entry.length} bytes; run fsck`);
      dataPageKeyInto(id, into);
    },
    newPage: emptyPage,
    place(page, key, entry) {
      entry.copy(page, setPresent(page, decodeId(key), true));
    },
  });
}
