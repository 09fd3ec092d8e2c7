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
