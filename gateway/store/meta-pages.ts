// The metamap as LMDB holds it: the entries of META_SLOTS neighbouring blocks of
// a volume share one value (a page), keyed by the volume and the page's first
// block. With a key per block, a 1 MiB write was 256 puts for the index writer
// (about 1.9 us each, half its time on sequential writes); now it is 16. A random
// 4 KiB write pays a read of its page in the writer as well as the put.
//
// A page is META_SLOTS block ids of 8 bytes each (layout.ts's id encoding); a
// block without an entry (a hole) is eight 0xff bytes, which no id, ZERO_BLOCK or
// MASK_BLOCK encodes to. A page of holes only is removed.

import type { Database, RootDatabase } from 'lmdb';
import { foldIntoPages } from './index-db';
import { decodeId, decodeMetaKey, encodeMetaKeyInto } from './layout';

export const META_SLOTS = 16;
export const META_PAGE_BYTES = META_SLOTS * 8;
const NONE = 0xffffffff;

/** A metamap page that is not one (its length is wrong): its blocks cannot be found. */
export class MetaPageError extends Error {
  readonly code = 'ERR_META_PAGE';
  constructor(
    message: string,
    /** The page's volume and first block, when it is a page of the tree. */
    readonly volume = -1,
    readonly first = -1,
  ) {
    super(message);
  }
}

/** The error for block `lba` of `volume`, whose page of the tree was found damaged. */
export function metaPageDamaged(volume: number, lba: number): MetaPageError {
  return new MetaPageError(
    `block ${lba} of volume #${volume}: its metamap page is damaged`,
    volume,
    lba - (lba % META_SLOTS),
  );
}

/** The key of the page holding block `lba` of `volume`, into a 12-byte buffer. */
export function metaPageKeyInto(volume: number, lba: number, b: Buffer): Buffer {
  return encodeMetaKeyInto(volume, lba - (lba % META_SLOTS), b);
}

/** A page of holes, to fill. */
export function emptyMetaPage(): Buffer {
  return Buffer.alloc(META_PAGE_BYTES, 0xff);
}

export function isEmptyMetaPage(page: Buffer): boolean {
  for (let at = 0; at < META_PAGE_BYTES; at += 4) if (page.readUInt32BE(at) !== NONE) return false;
  return true;
}

/** The id in `slot`, or undefined for a hole. */
export function slotId(page: Buffer, slot: number): number | undefined {
  const hi = page.readUInt32BE(slot * 8);
  const lo = page.readUInt32BE(slot * 8 + 4);
  return hi === NONE && lo === NONE ? undefined : hi * 2 ** 32 + lo;
}

/** Sets `slot` to `id`, or to a hole for undefined. */
export function setSlot(page: Buffer, slot: number, id: number | undefined): void {
  if (id === undefined) {
    page.writeUInt32BE(NONE, slot * 8);
    page.writeUInt32BE(NONE, slot * 8 + 4);
  } else {
    page.writeUInt32BE(Math.floor(id / 2 ** 32), slot * 8);
    page.writeUInt32BE(id % 2 ** 32, slot * 8 + 4);
  }
}

function pageError(volume: number, first: number, page: Buffer): MetaPageError {
  return new MetaPageError(
    `metamap page of volume #${volume} at block ${first} holds ${page.length} bytes, not ${META_PAGE_BYTES}`,
    volume,
    first,
  );
}

/** The id block `lba` of `volume` maps to in the tree, undefined for none. Throws MetaPageError. */
export function lookupMetaPage(
  db: Database<Buffer, Buffer>,
  volume: number,
  lba: number,
  keyBuf: Buffer,
): number | undefined {
  const page = db.getBinaryFast(metaPageKeyInto(volume, lba, keyBuf));
  if (page === undefined) return undefined;
  if (page.length !== META_PAGE_BYTES) throw pageError(volume, lba - (lba % META_SLOTS), page);
  return slotId(page, lba % META_SLOTS);
}

const END = 2 ** 40;

/**
 * Calls `fn` for every entry in the tree, in key order: of blocks [from, to) of `volume`,
 * or of every volume for a null range. A damaged page goes to `onBad` (skipped) or, without
 * one, throws MetaPageError.
 */
export function forEachMeta(
  db: Database<Buffer, Buffer>,
  range: { volume: number; from: number; to?: number } | null,
  fn: (volume: number, lba: number, id: number) => void,
  onBad?: (err: MetaPageError) => void,
): void {
  const from = range?.from ?? 0;
  const to = range?.to ?? END;
  const scan = range
    ? db.getRange({
        start: encodeMetaKeyInto(range.volume, from - (from % META_SLOTS), Buffer.allocUnsafe(12)),
        end:
          to >= END
            ? encodeMetaKeyInto(range.volume + 1, 0, Buffer.allocUnsafe(12))
            : encodeMetaKeyInto(range.volume, to, Buffer.allocUnsafe(12)),
      })
    : db.getRange({});
  for (const { key, value } of scan) {
    const { volume, lba: first } = decodeMetaKey(key as Buffer);
    const page = value as Buffer;
    if (page.length !== META_PAGE_BYTES) {
      const err = pageError(volume, first, page);
      if (!onBad) throw err;
      onBad(err);
      continue;
    }
    for (let slot = 0; slot < META_SLOTS; slot++) {
      const lba = first + slot;
      if (lba < from || lba >= to) continue;
      const id = slotId(page, slot);
      if (id !== undefined) fn(volume, lba, id);
    }
  }
}

/**
 * Converts a metamap kept as an entry per block (stores made before pages) into pages
 * (foldIntoPages). An entry of the wrong length stops it, the store left as it was.
 * Returns the entries converted.
 */
export function convertLegacyMeta(
  env: RootDatabase,
  legacy: Database<Buffer, Buffer>,
  pages: Database<Buffer, Buffer>,
): number {
  return foldIntoPages(env, legacy, pages, {
    keyBytes: 12,
    pageKeyInto(key, value, into) {
      const at = decodeMetaKey(key);
      if (value.length !== 8)
        throw new MetaPageError(
          `volume #${at.volume} block ${at.lba}: metamap entry of ${value.length} bytes; run fsck`,
        );
      metaPageKeyInto(at.volume, at.lba, into);
    },
    newPage: emptyMetaPage,
    place(page, key, value) {
      setSlot(page, decodeMetaKey(key).lba % META_SLOTS, decodeId(value));
    },
  });
}
