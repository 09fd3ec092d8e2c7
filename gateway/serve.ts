// `blockgate serve`: the gateway process. Locks the data directory, opens
// the volumes, listens for NBD clients and the admin CLI, and on SIGTERM or
// SIGINT finishes in-flight requests, flushes every volume and exits 0.

import fs from 'node:fs';
import path from 'node:path';
import { native } from '../native-bindings';
import { AdminServer } from './control/admin-server';
import { commandTable } from './control/commands';
import { NbdServer } from './nbd/server';
import { formatListenAddress, ListenAddress } from './nbd/listen-address';
import { DataDirLock } from './util/data-lock';
import { reexecWithHeapFlags } from './util/heap-flags';
import { createLogger } from './util/log';
import { VolumeManager } from './volume/manager';
import { MaterializePolicy } from './volume/materialize-policy';
import { gatewayId, loadClusterKey } from './replication/identity';
import { LinkListener } from './replication/link-listener';
import type { LinkIdentity } from './replication/link';

export interface ServeOptions {
  dataDir: string;
  listen: ListenAddress[];
  adminPath: string;
  /** See StoreOptions.hashPoolMin. */
  hashPoolMin?: number | null;
  /** See StoreOptions.metaCacheBytes. */
  metaCacheBytes?: number;
  /** Accept replication links from peer gateways here (TCP), authenticated with the cluster key. */
  replicationListen?: { host: string; port: number };
  clusterKeyFile?: string;
  /** A sync replica silent for this long drops to behind (default 10 s). */
  mirrorTimeoutMs?: number;
  /** Unacknowledged client data a replica may trail by before writes wait for it (default 64 MiB). */
  mirrorBufferBytes?: number;
  /** Materialize dedup volumes whose cold sequential reads take more reads per MiB than this. */
  materializeAbove?: number;
  /** How often the materialize policy looks (default 10 min). */
  materializeEveryMs?: number;
}

const DEFAULT_MATERIALIZE_EVERY_MS = 10 * 60_000;

/** The longest frame accepted from an authenticated peer: a 32 MiB write batch with its metadata. */
const MAX_LINK_FRAME = 64 * 1024 * 1024;

/**
 * Reply slabs, pooled buffers and index tables up to this size come from the C heap,
 * and freed heap is kept up to the second figure: returned to the kernel, each page
 * costs a fault to get back (about 16 us on the VMs measured), which cost 4k random
 * reads a fifth of their rate. Bounded, so an idle gateway's RSS stays modest.
 */
const HEAP_MMAP_THRESHOLD = 8 * 1024 * 1024;
const HEAP_TRIM_THRESHOLD = 64 * 1024 * 1024;

export async function serve(opts: ServeOptions): Promise<void> {
  // First, before anything is opened or locked: this may start the process over.
  const heapNote = reexecWithHeapFlags();
  const log = createLogger();
  if (heapNote) log.warn(heapNote);
  if (!native.keepHeapMemory(HEAP_MMAP_THRESHOLD, HEAP_TRIM_THRESHOLD))
    log.debug('the C library keeps its own heap policy (not glibc)');
  fs.mkdirSync(opts.dataDir, { recursive: true, mode: 0o700 });
  const lock = DataDirLock.acquire(opts.dataDir);
  // The cluster key comes first: a new dedup store derives its content-id secret from it.
  let me: LinkIdentity | undefined;
  if (opts.clusterKeyFile !== undefined) {
    let loaded;
    try {
      loaded = loadClusterKey(opts.clusterKeyFile);
    } catch (err) {
      log.error(`cannot start: ${(err as Error).message}`);
      lock.release();
      process.exit(1);
    }
    if (loaded.warning) log.warn(loaded.warning);
    me = { gatewayId: gatewayId(opts.dataDir), key: loaded.key, maxFrame: MAX_LINK_FRAME };
  }
  const volumes = await VolumeManager.open(
    opts.dataDir,
    log.child('volume'),
    {
      ...(opts.hashPoolMin !== undefined ? { hashPoolMin: opts.hashPoolMin } : {}),
      ...(opts.metaCacheBytes !== undefined ? { metaCacheBytes: opts.metaCacheBytes } : {}),
      ...(me ? { secretSeed: me.key } : {}),
    },
    {
      ...(me ? { link: me } : {}),
      ...(opts.mirrorTimeoutMs !== undefined ? { mirrorTimeoutMs: opts.mirrorTimeoutMs } : {}),
      ...(opts.mirrorBufferBytes !== undefined ? { mirrorBufferBytes: opts.mirrorBufferBytes } : {}),
    },
  );
  const nbd = new NbdServer(volumes, log.child('nbd'));
  const policy =
    opts.materializeAbove !== undefined
      ? new MaterializePolicy(
          volumes,
          opts.materializeAbove,
          opts.materializeEveryMs ?? DEFAULT_MATERIALIZE_EVERY_MS,
          log.child('materialize'),
        )
      : null;
  const listeners: string[] = [];
  const status = { startedAt: Date.now(), listeners };
  const admin = new AdminServer(opts.adminPath, commandTable(volumes, status), log.child('admin'));

  let replication: LinkListener | null = null;
  let stopping = false;
  const stop = async (signal: string): Promise<void> => {
    if (stopping) {
      log.warn(`${signal} again: exiting without waiting`);
      process.exit(1);
    }
    stopping = true;
    log.info(`${signal}: finishing in-flight requests`);
    await admin.close();
    await replication?.close();
    await nbd.close();
    await policy?.close();
    await volumes.close();
    lock.release();
    log.info('stopped cleanly');
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));

  try {
    for (const addr of opts.listen) listeners.push(formatListenAddress(await nbd.listen(addr)));
    if (opts.replicationListen && me) {
      replication = new LinkListener(me, log.child('replication'), volumes);
      const { host } = opts.replicationListen;
      const port = await replication.listen(host, opts.replicationListen.port);
      const where = formatListenAddress({ kind: 'tcp', host, port });
      listeners.push(`replication ${where}`);
      log.info(`replication: gateway ${me.gatewayId} listening on ${where}`);
    }
    await admin.listen();
  } catch (err) {
    log.error(`cannot start: ${(err as Error).message}`);
    await replication?.close();
    await nbd.close();
    await volumes.close();
    lock.release();
    process.exit(1);
  }
  log.info(`ready: data ${path.resolve(opts.dataDir)}, ${volumes.listVolumes().length} volume(s)`);
}
