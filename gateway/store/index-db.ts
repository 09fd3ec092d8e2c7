import path from 'node:path';
import { Database, open, RootDatabase } from 'lmdb';

/** The dedup store's LMDB environment and its trees, as the store, its writer and fsck open it. */
export interface IndexDb {
  env: RootDatabase;
  meta: Database<Buffer, Buffer>;
  data: Database<Buffer, Buffer>;
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
  return {
    env,
    meta: env.openDB<Buffer, Buffer>({ name: 'meta', ...binary }),
    data: env.openDB<Buffer, Buffer>({ name: 'data', ...binary }),
    hash: env.openDB<Buffer, Buffer>({ name: 'hash', ...binary }),
    state: env.openDB<unknown, string>({ name: 'state', encoding: 'json' }),
  };
}
