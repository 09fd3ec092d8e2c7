// Edits of a stopped store's metamap tree, for tests that change a store behind its back.

import type { Database } from 'lmdb';
import {
  META_PAGE_BYTES,
  META_SLOTS,
  emptyMetaPage,
  isEmptyMetaPage,
  lookupMetaPage,
  metaPageKeyInto,
  setSlot,
} from '../../gateway/store/meta-pages';

/** The id block `lba` of volume `vid` maps to in the tree (undefined: no entry). */
export function metaEntry(db: Database<Buffer, Buffer>, vid: number, lba: number): number | undefined {
  return lookupMetaPage(db, vid, lba, Buffer.alloc(12));
}

/** Sets block `lba`'s entry of volume `vid` to `id`, or removes it for undefined. */
export async function setMetaEntry(
  db: Database<Buffer, Buffer>,
  vid: number,
  lba: number,
  id: number | undefined,
): Promise<void> {
  const key = metaPageKeyInto(vid, lba, Buffer.alloc(12));
  const stored = db.getBinary(key);
  const page = stored?.length === META_PAGE_BYTES ? Buffer.from(stored) : emptyMetaPage();
  setSlot(page, lba % META_SLOTS, id);
  if (isEmptyMetaPage(page)) await db.remove(key);
  else await db.put(key, page);
}
