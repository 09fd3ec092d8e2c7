// `blockgate serve`: the gateway process. Locks the data directory, opens
// the volumes, listens for NBD clients and the admin CLI, and on SIGTERM or
// SIGINT finishes in-flight requests, flushes every volume and exits 0.

import fs from 'node:fs';
import path from 'node:path';
import { AdminServer } from './control/admin-server';
import { commandTable } from './control/commands';
import { NbdServer } from './nbd/server';
import { formatListenAddress, ListenAddress } from './nbd/listen-address';
import { DataDirLock } from './util/data-lock';
import { createLogger } from './util/log';
import { VolumeManager } from './volume/manager';

export interface ServeOptions {
  dataDir: string;
  listen: ListenAddress[];
  adminPath: string;
  /** See StoreOptions.hashPoolMin. */
  hashPoolMin?: number | null;
}

export async function serve(opts: ServeOptions): Promise<void> {
  const log = createLogger();
  fs.mkdirSync(opts.dataDir, { recursive: true, mode: 0o700 });
  const lock = DataDirLock.acquire(opts.dataDir);
  const volumes = await VolumeManager.open(opts.dataDir, log.child('volume'), {
    ...(opts.hashPoolMin !== undefined ? { hashPoolMin: opts.hashPoolMin } : {}),
  });
  const nbd = new NbdServer(volumes, log.child('nbd'));
  const listeners: string[] = [];
  const status = { startedAt: Date.now(), listeners };
  const admin = new AdminServer(opts.adminPath, commandTable(volumes, status), log.child('admin'));

  let stopping = false;
  const stop = async (signal: string): Promise<void> => {
    if (stopping) {
      log.warn(`${signal} again: exiting without waiting`);
      process.exit(1);
    }
    stopping = true;
    log.info(`${signal}: finishing in-flight requests`);
    await admin.close();
    await nbd.close();
    await volumes.close();
    lock.release();
    log.info('stopped cleanly');
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));

  try {
    for (const addr of opts.listen) listeners.push(formatListenAddress(await nbd.listen(addr)));
    await admin.listen();
  } catch (err) {
    log.error(`cannot start: ${(err as Error).message}`);
    await nbd.close();
    await volumes.close();
    lock.release();
    process.exit(1);
  }
  log.info(`ready: data ${path.resolve(opts.dataDir)}, ${volumes.listVolumes().length} volume(s)`);
}
