import path from 'node:path';
import { Database, open, RootDatabase } from 'lmdb';

/** The dedup store's LMDB environment and its trees, as the store, its writer and fsck open it. */
export interface IndexDb {
  env: RootDatabase;
  /** The metamap, in pages of entries (meta-pages.ts). Absent only read-only, from a store not yet converted. */
  meta: Database<Buffer, Buffer> | undefined;
  /**
   * The metamap as stores before pages kept it, an entry per block, converted when the
   * store opens (convertLegacyMeta). Absent read-only, from a store made since.
   */
  legacyMeta: Database<Buffer, Buffer> | undefined;
  /** The datamap, in pages of entries (data-pages.ts). Absent only read-only, from a store not yet converted. */
  data: Database<Buffer, Buffer> | undefined;
  /**
   * The datamap as stores before pages kept it, an entry per block id, converted when the
   * store opens (convertLegacyRows). Absent read-only, from a store made since.
   */
  legacyData: Database<Buffer, Buffer> | undefined;
  hash: Database<Buffer, Buffer>;
  state: Database<unknown, string>;
}

export function openIndex(storeDir: string, opts: { readOnly?: boolean } = {}): IndexDb {
  const env = open({
    path: path.join(storeDir, 'index'),
    maxDbs: 8,
    compression: false,
    readOnly: opts.readOnly,
  });
  const binary = { keyEncoding: 'binary' as const, encoding: 'binary' as const };
  // Read-only, openDB answers undefined for a tree the store does not have.
  return {
    env,
    meta: env.openDB<Buffer, Buffer>({ name: 'meta-pages', ...binary }),
    legacyMeta: env.openDB<Buffer, Buffer>({ name: 'meta', ...binary }),
    data: env.openDB<Buffer, Buffer>({ name: 'data-pages', ...binary }),
    legacyData: env.openDB<Buffer, Buffer>({ name: 'data', ...binary }),
    hash: env.openDB<Buffer, Buffer>({ name: 'hash', ...binary }),
    state: env.openDB<unknown, string>({ name: 'state', encoding: 'json' }),
  };
}

/** How rows of a tree kept an entry per key go into pages (foldIntoPages). */
export interface PageFold {
  /** Bytes of a page key. */
  keyBytes: number;
  /** Writes the key of the page `key`'s row belongs in; throws for a row that cannot be converted. */
  pageKeyInto(key: Buffer, value: Buffer, into: Buffer): void;
  newPage(): Buffer;
  /** Puts the row into its page. */
  place(page: Buffer, key: Buffer, value: Buffer): void;
}

/**
 * Moves a tree kept an entry per key (stores written before pages) into pages, emptying
 * the old tree, in one transaction: a crash leaves either format whole, and a row that
 * throws leaves the store as it was, for fsck to report. The rows of one page come
 * together, in key order. Returns the rows moved.
 */
export function foldIntoPages(
  env: RootDatabase,
  legacy: Database<Buffer, Buffer>,
  pages: Database<Buffer, Buffer>,
  fold: PageFold,
): number {
  if (legacy.getKeysCount() === 0) return 0;
  let moved = 0;
  env.transactionSync(() => {
    // lmdb-js copies a key as it puts it: the two buffers take turns.
    let key = Buffer.alloc(fold.keyBytes);
    let next = Buffer.alloc(fold.keyBytes);
    let page: Buffer | null = null;
    for (const { key: k, value } of legacy.getRange({})) {
      fold.pageKeyInto(k, value, next);
      if (page === null || !next.equals(key)) {
        if (page) pages.put(key, page);
        [key, next] = [next, key];
        page = fold.newPage();
      }
      fold.place(page, k, value);
      moved++;
    }
    if (page) pages.put(key, page);
    legacy.clearSync();
  });
  return moved;
}
