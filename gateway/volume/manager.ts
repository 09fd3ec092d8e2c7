// The registry of volumes: creates, opens, resizes and deletes them, keeps
// the catalog on disk, and knows which NBD clients use which volume.

import { BarrierLayer } from '../device/barrier';
import { toBlockError } from '../device/errors';
import {
  BackendError,
  InvalidArgumentError,
  VolumeBusyError,
  VolumeExistsError,
  VolumeNotFoundError,
} from '../errors';
import type { ClientInfo, ExportRegistry, NbdExport } from '../nbd/registry';
import { Volume } from './volume';
import { DiffRange, SnapshotHost, SnapshotInfo, Snapshots, snapshotExportName } from './snapshots';
import { SeedExportReport, SeedImportReport, Seeds } from './seeds';
import type { Logger } from '../util/log';
import { formatSize } from '../util/size';
import { CompactionResult, Compactor } from '../store/compactor';
import { DedupStore, StoreOptions, StoreStats } from '../store/dedup-store';
import { BLOCK } from '../store/layout';
import fs from 'node:fs';
import path from 'node:path';
import { allocatedBytes, openStack, removeBackingStore } from './backends';
import { Backend, BACKENDS, Catalog, NAME_PATTERN, ReplicaConfig, VolumeRecord } from './catalog';
import { LinkProtocolError } from '../../protocol/replication/errors';
import type { LinkIdentity } from '../replication/link';
import {
  byteRanges,
  FETCH_BLOCKS_MAX,
  Mirror,
  MirrorMode,
  MirrorStatus,
  VerifyReport,
} from '../replication/mirror';
import { MirrorLayer } from '../replication/mirror-layer';
import { ReplicaVolumes, SupersededError } from '../replication/replica-sink';
import { parseListenAddress } from '../nbd/listen-address';

export const DEFAULT_VOLUME = 'disk0';
export const DEFAULT_VOLUME_SIZE = 8 * 2 ** 30;
export const DEFAULT_BACKEND: Backend = 'dedup';
const NAME = NAME_PATTERN;
/** Largest volume: offsets must stay exact in a JS number. */
const MAX_SIZE = 2 ** 52;

export interface VolumeInfo {
  name: string;
  size: number;
  backend: Backend;
  readOnly: boolean;
  path: string | null;
  allocatedBytes: number;
  clients: number;
  created: string;
  /** Set on a clone: the snapshot it was made from, VOL@SNAP. */
  cloneOf: string | null;
  /** Snapshots of this volume (see `snapshot list`). */
  snapshots: number;
  /** Dedup volumes only (volume info): what its metamap holds. */
  dedup?: {
    logicalBytes: number;
    zeroBlocks: number;
    exclusiveBytes: number;
    /** Expected separate segment reads per MiB of a cold sequential read (1 is ideal). */
    fragmentation: number;
  };
}

export interface CreateOptions {
  name: string;
  size?: number;
  backend?: Backend;
  readOnly?: boolean;
  path?: string;
}

/** Mirroring settings: this gateway's identity on links (none without a cluster key). */
export interface ReplicationOptions {
  link?: LinkIdentity;
  /** A sync replica silent for this long drops to behind. */
  mirrorTimeoutMs?: number;
  /** Unacknowledged client data a replica may trail by before writes wait for it (MirrorOptions.bufferBytes). */
  mirrorBufferBytes?: number;
}

const DEFAULT_MIRROR_TIMEOUT_MS = 10_000;
const DEFAULT_MIRROR_BUFFER_BYTES = 64 * 2 ** 20;
/** replica add --cutover: bytes the replica may still lack when writes are held for the switch. */
const DEFAULT_CUTOVER_THRESHOLD = 64 * 2 ** 20;
/** How long writes may be held while the replica catches up the rest and promotes itself. */
const CUTOVER_BARRIER_MS = 30_000;
/** How long a cutover waits for the replica to get in sync at all. */
const CUTOVER_WAIT_MS = 24 * 3600_000;

/** `materialize`: reads per MiB of cold sequential read before and after, and what moved. */
export interface MaterializeReport {
  volume: string;
  before: number;
  after: number;
  movedBlocks: number;
  movedBytes: number;
  ms: number;
}

/** `replica list`: the volume's role and generation here, and its replicas' states. */
export interface ReplicaListing {
  volume: string;
  role: 'primary' | 'replica';
  primary: string | null;
  generation: number;
  splitBrain: { peer: string; generation: number; at: string } | null;
  replicas: MirrorStatus[];
}

export class VolumeManager implements ExportRegistry, ReplicaVolumes {
  private readonly volumes = new Map<string, Volume>();
  private readonly catalog: Catalog;
  private dedup: DedupStore | null = null;
  private compactor: Compactor | null = null;
  /** The data directory's dedup store, opened with its compactor when a dedup volume first needs it. */
  private readonly store = (): DedupStore => {
    if (!this.dedup) {
      this.dedup = DedupStore.open(
        path.join(this.dataDir, 'store'),
        this.log.child('store'),
        this.storeOptions,
      );
      this.compactor = new Compactor(this.dedup, this.log.child('compactor'));
    }
    return this.dedup;
  };
  /** Serialises changes so two admin commands never interleave their catalog writes. */
  private queue: Promise<unknown> = Promise.resolve();
  private readonly snapshots: Snapshots;
  private readonly seeds: Seeds;
  /** The volume a materialize is rewriting, if any. */
  private materializing: string | null = null;

  private constructor(
    readonly dataDir: string,
    private readonly log: Logger,
    private readonly storeOptions: StoreOptions,
    private readonly replication: ReplicationOptions,
  ) {
    this.catalog = new Catalog(dataDir);
    const host: SnapshotHost = {
      log: this.log,
      store: this.store,
      volume: (name) => this.volume(name),
      has: (name) => this.volumes.has(name),
      register: (rec) => {
        const v = this.openVolume(rec);
        this.volumes.set(rec.name, v);
        return v;
      },
      saveCatalog: () => this.catalog.save(this.records()),
    };
    this.snapshots = new Snapshots(host);
    this.seeds = new Seeds(
      {
        ...host,
        gatewayId: () => this.replication.link?.gatewayId ?? 'standalone',
        exclusive: (fn) => this.exclusive(fn),
        remove: (name) => this.removeVolume(name),
      },
      this.snapshots,
    );
  }

  /** Opens every volume of the data directory; an empty directory gets the default volume. */
  static async open(
    dataDir: string,
    log: Logger,
    storeOptions: StoreOptions = {},
    replication: ReplicationOptions = {},
  ): Promise<VolumeManager> {
    const m = new VolumeManager(dataDir, log, storeOptions, replication);
    if (!m.catalog.exists()) {
      m.catalog.save([]);
      await m.create({ name: DEFAULT_VOLUME, size: DEFAULT_VOLUME_SIZE });
      log.info(`created default volume ${DEFAULT_VOLUME} (${formatSize(DEFAULT_VOLUME_SIZE)}, thin)`);
      return m;
    }
    const records = m.catalog.load();
    if (records.some((r) => r.backend === 'dedup') || fs.existsSync(path.join(dataDir, 'store', 'index'))) {
      // A crash between a delete's catalog write and its store purge leaves blocks nobody can reach.
      const store = m.store();
      const known = new Set([
        ...records.filter((r) => r.backend === 'dedup').map((r) => r.name),
        ...Snapshots.storeNames(records),
      ]);
      // Clones before the snapshots they read through: a pass releases what nothing depends on.
      let unknown = store.volumeNames().filter((name) => !known.has(name));
      for (let pass = 0; unknown.length > 0 && pass < 8; pass++) {
        for (const name of unknown) {
          if (store.dependents(store.volumeId(name)).length) continue;
          log.warn(`store holds blocks of volume ${name}, which the catalog no longer has: releasing them`);
          await store.deleteVolume(name);
        }
        unknown = store.volumeNames().filter((name) => !known.has(name));
      }
      for (const name of unknown)
        log.error(`store volume ${name} is unknown to the catalog but still in use`);
    }
    for (const rec of records) {
      try {
        m.volumes.set(rec.name, m.openVolume(rec));
      } catch (err) {
        // One broken volume must not keep the others offline.
        log.error(`volume ${rec.name} could not be opened: ${(err as Error).message}`);
      }
    }
    m.snapshots.openExports(records.filter((r) => r.backend === 'dedup'));
    return m;
  }

  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private records(): VolumeRecord[] {
    return [...this.volumes.values()].map((v) => v.record);
  }

  private volume(name: string): Volume {
    const v = this.volumes.get(name);
    if (!v) throw new VolumeNotFoundError(`no volume named '${name}'`);
    return v;
  }

  create(opts: CreateOptions): Promise<VolumeInfo> {
    return this.exclusive(async () => {
      if (!NAME.test(opts.name)) {
        throw new InvalidArgumentError(
          `invalid volume name '${opts.name}': use letters, digits, '.', '_', '+', '-' (at most 128)`,
        );
      }
      if (this.volumes.has(opts.name)) throw new VolumeExistsError(`volume '${opts.name}' already exists`);
      const backend = opts.backend ?? DEFAULT_BACKEND;
      if (!BACKENDS.includes(backend)) {
        throw new InvalidArgumentError(`unknown backend '${backend}': use ${BACKENDS.join(' or ')}`);
      }
      if (opts.path !== undefined && backend !== 'raw') {
        throw new InvalidArgumentError('--path is only for the raw backend');
      }
      if (opts.size === undefined && opts.path === undefined)
        throw new InvalidArgumentError('--size is required');
      if (opts.size !== undefined) checkSize(opts.size);
      const record: VolumeRecord = {
        name: opts.name,
        size: opts.size ?? 0,
        backend,
        readOnly: opts.readOnly ?? false,
        ...(opts.path !== undefined ? { path: opts.path } : {}),
        created: new Date().toISOString(),
      };
      let vol: Volume;
      try {
        vol = this.openVolume(record);
      } catch (err) {
        throw new BackendError(`cannot create volume '${opts.name}': ${toBlockError(err, 'open').message}`);
      }
      const device = vol.device;
      // An operator's file or device keeps its own size: a --size that differs is a mistake
      // to tell about, not one to follow silently.
      if (opts.path !== undefined && opts.size !== undefined && opts.size !== device.size) {
        await device.close();
        throw new InvalidArgumentError(
          `--size ${formatSize(opts.size)} differs from the ${formatSize(device.size)} of ${opts.path}; leave it out to use the whole of it`,
        );
      }
      record.size = device.size;
      this.volumes.set(record.name, vol);
      try {
        this.catalog.save(this.records());
      } catch (err) {
        this.volumes.delete(record.name);
        await device.close();
        removeBackingStore(this.dataDir, record);
        throw err;
      }
      this.log.info(`volume ${record.name} created: ${vol.description}`);
      return this.describe(vol);
    });
  }

  delete(name: string): Promise<void> {
    return this.exclusive(() => this.removeVolume(name));
  }

  /** delete's work, for callers already inside exclusive(). */
  private async removeVolume(name: string): Promise<void> {
    const vol = this.volume(name);
    if (vol.clients.size > 0) {
      throw new VolumeBusyError(
        `volume '${name}' has ${vol.clients.size} connected client(s); disconnect them first`,
      );
    }
    const snaps = (vol.record.snapshots ?? []).filter((s) => s.forClone === undefined);
    if (snaps.length)
      throw new VolumeBusyError(
        `volume '${name}' has snapshots (${snaps.map((s) => s.name).join(', ')}): delete them first`,
      );
    const clones = (vol.record.snapshots ?? []).map((s) => s.forClone).filter((c) => c !== undefined);
    if (clones.length)
      throw new VolumeBusyError(`volume '${name}' has clones (${clones.join(', ')}): delete them first`);
    this.volumes.delete(name);
    this.catalog.save(this.records());
    for (const m of vol.mirrors) m.close(true);
    await vol.device.close();
    removeBackingStore(this.dataDir, vol.record);
    if (vol.record.backend === 'dedup') {
      await this.store().deleteVolume(name);
      await this.snapshots.releaseCloneBase(vol.record);
    }
    this.log.info(`volume ${name} deleted`);
  }

  resize(name: string, size: number): Promise<VolumeInfo> {
    return this.exclusive(async () => {
      const vol = this.volume(name);
      checkSize(size);
      if (vol.record.readOnly) throw new InvalidArgumentError(`volume '${name}' is read-only`);
      if (size < vol.device.size && vol.clients.size > 0) {
        throw new VolumeBusyError(
          `cannot shrink volume '${name}' while ${vol.clients.size} client(s) are connected`,
        );
      }
      try {
        await vol.device.resize(size);
      } catch (err) {
        throw new BackendError(`cannot resize volume '${name}': ${toBlockError(err, 'resize').message}`);
      }
      vol.record = { ...vol.record, size };
      this.catalog.save(this.records());
      this.log.info(`volume ${name} resized to ${formatSize(size)}`);
      if (vol.mirrors.length > 0) this.restartMirrors(vol);
      return this.describe(vol);
    });
  }

  async info(name: string): Promise<VolumeInfo> {
    const vol = this.volume(name);
    const info = this.describe(vol);
    if (vol.record.backend === 'dedup') {
      const store = this.store();
      const s = await store.volumeStats(store.volumeId(name));
      info.dedup = {
        logicalBytes: s.mappedBlocks * 4096,
        zeroBlocks: s.zeroBlocks,
        exclusiveBytes: s.exclusiveBlocks * 4096,
        fragmentation: store.fragmentation(store.volumeId(name), Math.ceil(vol.device.size / 4096))
          .readsPerMiB,
      };
    }
    return info;
  }

  listVolumes(): VolumeInfo[] {
    return [...this.volumes.values()]
      .map((v) => this.describe(v))
      .sort((a, b) => a.name.localeCompare(b.name));
  }

  /**
   * A dedup volume's allocation is what its own entries map to data (before sharing and
   * lz4); a memory volume's, its pages; a raw one's, its file's.
   */
  private allocated(v: Volume): number {
    const rec = v.record;
    if (rec.backend === 'memory') return v.device.allocatedBytes?.() ?? 0;
    if (rec.backend !== 'dedup') return allocatedBytes(this.dataDir, rec, v.device.size);
    const store = this.store();
    const id = store.volumeIdIfAny(rec.name);
    return id === undefined ? 0 : store.volumeDataBlocks(id) * BLOCK;
  }

  private describe(v: Volume): VolumeInfo {
    return {
      name: v.record.name,
      size: v.device.size,
      backend: v.record.backend,
      readOnly: v.record.readOnly,
      path: v.record.path ?? null,
      allocatedBytes: this.allocated(v),
      clients: v.clients.size,
      created: v.record.created,
      cloneOf: v.record.cloneOf ?? null,
      snapshots: v.record.snapshots?.length ?? 0,
    };
  }

  // ExportRegistry: every volume is an export of the same name.

  defaultExport(): string | null {
    if (this.volumes.has(DEFAULT_VOLUME)) return DEFAULT_VOLUME;
    return this.volumes.size === 1 ? [...this.volumes.keys()][0]! : null;
  }

  list(): Array<{ name: string; description: string }> {
    return [...this.volumes.values(), ...this.snapshots.all()].map((v) => ({
      name: v.name,
      description: v.description,
    }));
  }

  get(name: string): NbdExport | null {
    return this.volumes.get(name) ?? this.snapshots.get(name) ?? null;
  }

  attach(name: string, client: ClientInfo): () => void {
    const vol = this.snapshots.get(name) ?? this.volume(name);
    if (vol.changingRole)
      throw new VolumeBusyError(`volume '${name}' is being ${vol.changingRole}d; connect again in a moment`);
    vol.clients.set(client.id, client);
    return () => vol.clients.delete(client.id);
  }

  /** A volume's device stack; a primary dedup volume gets the write splitter on top, with its mirrors. */
  private openVolume(rec: VolumeRecord): Volume {
    const device = openStack(this.dataDir, rec, this.store);
    if (rec.backend !== 'dedup') return new Volume(rec, device);
    if (rec.replicaOf !== undefined) {
      const barrier = new BarrierLayer(device);
      return new Volume(rec, barrier, barrier);
    }
    const store = this.store();
    let vol: Volume | null = null;
    const layer = new MirrorLayer(
      device,
      store,
      store.volumeId(rec.name),
      () => vol!.mirrors,
      () => {
        if (vol!.changingRole) return `volume ${rec.name} is being ${vol!.changingRole}d`;
        const sb = vol!.record.splitBrain;
        return sb
          ? `split brain: gateway ${sb.peer} holds volume ${rec.name} at generation ${sb.generation}; demote this copy`
          : null;
      },
    );
    const barrier = new BarrierLayer(layer);
    vol = new Volume(rec, barrier, barrier);
    for (const r of rec.replicas ?? []) {
      try {
        vol.mirrors.push(this.startMirror(rec, r, true));
      } catch (err) {
        this.log.error(`volume ${rec.name}: replica ${r.to}: ${(err as Error).message}`);
      }
    }
    return vol;
  }

  /** `resumed`: at the gateway's start, so writes wait for the replica's first answer. */
  private startMirror(rec: VolumeRecord, r: ReplicaConfig, resumed = false): Mirror {
    const link = this.replication.link;
    if (!link)
      throw new InvalidArgumentError('this gateway has no cluster key: start it with --cluster-key FILE');
    const addr = parseListenAddress(r.to);
    if (addr.kind !== 'tcp') throw new InvalidArgumentError(`replica address '${r.to}' is not HOST:PORT`);
    const store = this.store();
    return new Mirror(
      store,
      store.volumeId(rec.name),
      rec.name,
      Math.ceil(rec.size / 4096),
      { host: addr.host, port: addr.port },
      r.mode,
      link,
      this.log.child('mirror'),
      {
        timeoutMs: this.replication.mirrorTimeoutMs ?? DEFAULT_MIRROR_TIMEOUT_MS,
        bufferBytes: this.replication.mirrorBufferBytes ?? DEFAULT_MIRROR_BUFFER_BYTES,
        generation: generationOf(rec),
        maxRate: r.maxRate ?? 0,
        dr: r.dr === true,
        holdWritesUntilAnswer: resumed,
        ...this.seedOf(rec, r),
        activityLog: path.join(
          this.dataDir,
          'mirrors',
          `${rec.name}@${r.to.replace(/[^A-Za-z0-9.-]/g, '_')}.al`,
        ),
        onSuperseded: (peer, generation) => {
          const vol = this.volumes.get(rec.name);
          if (vol) this.markSplitBrain(vol, peer, generation);
        },
      },
    );
  }

  /** The newest seed bundle exported of a volume (replica add --seeded); refused when there is none. */
  private latestSeed(rec: VolumeRecord): string {
    const seed = rec.seeds?.[rec.seeds.length - 1];
    if (!seed)
      throw new InvalidArgumentError(
        `volume '${rec.name}' has no seed export: run 'blockgate seed export' first`,
      );
    if (!rec.snapshots?.some((s) => s.name === seed.snapshot))
      throw new InvalidArgumentError(`the snapshot of seed ${seed.bundleId} (${seed.snapshot}) was deleted`);
    return seed.bundleId;
  }

  /** A mirror's seed option: the bundle and its export-point snapshot, while that snapshot exists. */
  private seedOf(rec: VolumeRecord, r: ReplicaConfig): { seed?: { bundleId: Buffer; snapshot: number } } {
    const seed = r.seed ? rec.seeds?.find((s) => s.bundleId === r.seed) : undefined;
    if (!seed || !rec.snapshots?.some((s) => s.name === seed.snapshot)) return {};
    const store = this.store();
    return {
      seed: {
        bundleId: Buffer.from(seed.bundleId, 'hex'),
        snapshot: store.volumeId(snapshotExportName(rec.name, seed.snapshot)),
      },
    };
  }

  /** `replica add`: mirrors a dedup volume to another gateway, starting with a hash-first sync. */
  replicaAdd(
    name: string,
    to: string,
    mode: MirrorMode = 'async',
    opts: { dr?: boolean; maxRate?: number; seeded?: boolean; cutover?: boolean; threshold?: number } = {},
  ): Promise<MirrorStatus> {
    return this.exclusive(async () => {
      const vol = this.volume(name);
      if (vol.record.backend !== 'dedup')
        throw new InvalidArgumentError(
          `volume '${name}' is ${vol.record.backend}: only dedup volumes are mirrored`,
        );
      if (vol.record.replicaOf !== undefined)
        throw new InvalidArgumentError(`volume '${name}' is a replica (of gateway ${vol.record.replicaOf})`);
      if (mode !== 'sync' && mode !== 'async')
        throw new InvalidArgumentError(`unknown mode '${String(mode)}': use sync or async`);
      let addr;
      try {
        addr = parseListenAddress(to);
      } catch (err) {
        throw new InvalidArgumentError(`--to: ${(err as Error).message}`);
      }
      if (addr.kind !== 'tcp') throw new InvalidArgumentError('--to takes HOST:PORT');
      const canonical = `${addr.host}:${addr.port}`;
      if (vol.mirrors.some((m) => m.address === canonical))
        throw new VolumeExistsError(`volume '${name}' is already mirrored to ${canonical}`);
      if (opts.maxRate !== undefined && !(Number.isSafeInteger(opts.maxRate) && opts.maxRate > 0))
        throw new InvalidArgumentError(`invalid --max-rate ${opts.maxRate}`);
      if (opts.threshold !== undefined && !(Number.isSafeInteger(opts.threshold) && opts.threshold >= 0))
        throw new InvalidArgumentError(`invalid --threshold ${opts.threshold}`);
      if (opts.threshold !== undefined && !opts.cutover)
        throw new InvalidArgumentError(
          '--threshold applies to --cutover (how much may be left when writes pause)',
        );
      if (opts.dr && vol.mirrors.some((m) => m.status().dr))
        throw new InvalidArgumentError(`volume '${name}' already has a --dr replica`);
      const config: ReplicaConfig = {
        to: canonical,
        mode,
        ...(opts.dr ? { dr: true } : {}),
        ...(opts.maxRate !== undefined ? { maxRate: opts.maxRate } : {}),
        ...(opts.seeded ? { seed: this.latestSeed(vol.record) } : {}),
      };
      const mirror = this.startMirror(vol.record, config);
      // The DR replica first: the write splitter hands every change to it before the others.
      if (opts.dr) vol.mirrors.unshift(mirror);
      else vol.mirrors.push(mirror);
      vol.record = { ...vol.record, replicas: [...(vol.record.replicas ?? []), config] };
      this.catalog.save(this.records());
      this.log.info(`volume ${name}: ${mode}${opts.dr ? ' DR' : ''} replica ${canonical} added`);
      if (opts.cutover)
        void this.cutoverWhenReady(name, mirror, opts.threshold ?? DEFAULT_CUTOVER_THRESHOLD).catch(
          (err: Error) => this.log.error(`volume ${name}: cutover to ${canonical}: ${err.message}`),
        );
      return mirror.status();
    });
  }

  /**
   * replica add --cutover: once the replica is in sync with at most `threshold` bytes
   * still owed, holds the volume's writes, lets the replica catch up and promote itself,
   * and turns this copy into its replica. Writes held meanwhile, and any after, are
   * refused (EPERM): the volume's primary is on the other gateway now.
   */
  private async cutoverWhenReady(name: string, mirror: Mirror, threshold: number): Promise<void> {
    const deadline = Date.now() + CUTOVER_WAIT_MS;
    for (;;) {
      const vol = this.volumes.get(name);
      if (!vol || !vol.mirrors.includes(mirror)) return;
      const st = mirror.status();
      if (st.state === 'in-sync' && st.lagBytes <= threshold) break;
      if (Date.now() > deadline)
        throw new Error(`the replica was not in sync within ${CUTOVER_WAIT_MS / 3600_000} h`);
      await new Promise((r) => setTimeout(r, 200));
    }
    await this.exclusive(async () => {
      const vol = this.volumes.get(name);
      if (!vol || !vol.mirrors.includes(mirror)) return;
      const release = await vol.holdWrites(CUTOVER_BARRIER_MS);
      vol.changingRole = 'demote';
      try {
        const peer = mirror.status().peer ?? 'unknown';
        const generation = await mirror.cutover(CUTOVER_BARRIER_MS);
        for (const m of vol.mirrors) m.close(true);
        vol.mirrors = [];
        const record: VolumeRecord = {
          ...vol.record,
          readOnly: true,
          replicaOf: peer,
        };
        delete record.replicas;
        delete record.splitBrain;
        await this.reopen(vol, record);
        this.log.info(
          `volume ${name}: cut over to ${mirror.address} (generation ${generation} there); a replica here now`,
        );
      } catch (err) {
        vol.changingRole = null;
        throw err;
      } finally {
        release();
      }
    });
  }

  /** ReplicaVolumes: the primary took a snapshot at this point of the batch order. */
  async replicaSnapshot(name: string, snap: string): Promise<void> {
    await this.exclusive(() => this.snapshots.create(name, snap));
  }

  /** ReplicaVolumes: replica add --cutover reached this copy; it becomes the primary. */
  async cutoverPromote(name: string): Promise<number> {
    return (await this.promote(name)).generation;
  }

  /** `replica remove`: stops mirroring to that gateway (its copy stays there). */
  replicaRemove(name: string, to: string): Promise<{ removed: string }> {
    return this.exclusive(async () => {
      const vol = this.volume(name);
      const mirror = vol.mirrors.find((m) => m.address === to);
      if (!mirror) throw new VolumeNotFoundError(`volume '${name}' has no replica at ${to}`);
      mirror.close(true);
      vol.mirrors = vol.mirrors.filter((m) => m !== mirror);
      vol.record = { ...vol.record, replicas: (vol.record.replicas ?? []).filter((r) => r.to !== to) };
      this.catalog.save(this.records());
      this.log.info(`volume ${name}: replica ${to} removed`);
      return { removed: to };
    });
  }

  /**
   * After a resize: every mirror starts again at the new size. Its replica resizes its
   * copy when the new link names it, and the sync (all chunks: the activity log was
   * sized for the old volume) goes hash-first, so only blocks the replica lacks travel.
   */
  private restartMirrors(vol: Volume): void {
    for (const m of vol.mirrors) m.close(true);
    const configs = vol.record.replicas ?? [];
    // The DR replica first, as replica add put it.
    const ordered = [...configs.filter((r) => r.dr), ...configs.filter((r) => !r.dr)];
    vol.mirrors = ordered.map((r) => this.startMirror(vol.record, r));
    this.log.info(`volume ${vol.record.name}: ${ordered.length} replica(s) resyncing at the new size`);
  }

  /** `replica list`: each replica's state, lag and sync progress; on a replica, whose copy it is. */
  replicaList(name: string): ReplicaListing {
    const vol = this.volume(name);
    return {
      volume: name,
      role: vol.record.replicaOf === undefined ? 'primary' : 'replica',
      primary: vol.record.replicaOf ?? null,
      generation: generationOf(vol.record),
      splitBrain: vol.record.splitBrain ?? null,
      replicas: vol.mirrors.map((m) => m.status()),
    };
  }

  /**
   * `verify`: each replica compared with this volume by content ids. With `scrub`, both
   * sides also read their copies back and check every block against its content id (a
   * scrub): the primary's damaged blocks are reported, a replica's are sent to it again.
   */
  async verify(
    name: string,
    opts: { scrub?: boolean } = {},
  ): Promise<{
    volume: string;
    replicas: VerifyReport[];
    damaged?: Array<{ offset: number; length: number }>;
    mended?: Array<{ offset: number; length: number }>;
  }> {
    const vol = this.volume(name);
    if (vol.record.replicaOf !== undefined)
      throw new InvalidArgumentError(`volume '${name}' is a replica here: verify it from its primary`);
    if (vol.mirrors.length === 0) throw new InvalidArgumentError(`volume '${name}' has no replicas`);
    // This copy first, while the replicas are as they were: a replica's own damage, found
    // below, sends its chunks to the resync, and its copy is then no longer in sync.
    let damaged: number[] = [];
    let mended: number[] = [];
    if (opts.scrub) {
      const store = this.store();
      const volumeId = store.volumeId(name);
      damaged = await store.scrub(volumeId, 0, Math.ceil(vol.device.size / BLOCK), { yieldToClients: true });
      mended = damaged.length ? await this.mend(name, volumeId, vol.mirrors, damaged) : [];
      if (damaged.length)
        this.log.error(
          `volume ${name}: ${damaged.length} damaged block(s) in this copy, ${mended.length} mended from a replica`,
        );
    }
    const replicas: VerifyReport[] = [];
    for (const m of vol.mirrors) {
      try {
        replicas.push(await m.verify(opts));
      } catch (err) {
        throw new BackendError((err as Error).message);
      }
    }
    if (!opts.scrub) return { volume: name, replicas };
    return { volume: name, replicas, damaged: byteRanges(damaged), mended: byteRanges(mended) };
  }

  /**
   * This copy's damaged blocks from replicas in sync, FETCH_BLOCKS_MAX at a time: each
   * block is asked of the replicas in turn until one gives bytes matching its content id.
   */
  private async mend(
    name: string,
    volumeId: number,
    mirrors: Mirror[],
    damaged: number[],
  ): Promise<number[]> {
    const store = this.store();
    const mended = new Set<number>();
    for (const m of mirrors) {
      const todo = damaged.filter((lba) => !mended.has(lba));
      for (let i = 0; i < todo.length; i += FETCH_BLOCKS_MAX) {
        const lbas = todo.slice(i, i + FETCH_BLOCKS_MAX);
        let blocks;
        try {
          blocks = await m.fetchBlocks(lbas);
        } catch (err) {
          this.log.warn(`volume ${name}: no blocks from ${m.address}: ${(err as Error).message}`);
          break;
        }
        const items = blocks
          .filter((b) => b.ordinal < lbas.length)
          .map((b) => ({ lba: lbas[b.ordinal]!, block: b }));
        for (const lba of await store.mendBlocks(volumeId, items)) mended.add(lba);
      }
    }
    return [...mended].sort((a, b) => a - b);
  }

  /** ReplicaVolumes: this gateway's copy of a volume a peer mirrors here. */
  replicaVolume(
    name: string,
    size: number,
    primary: string,
    generation: number,
    seed?: Buffer,
  ): Promise<{ store: DedupStore; volumeId: number; seeded: boolean }> {
    // A mirror that arrives while its seed is being imported waits for the whole import
    // (its volume in the catalog); waiting inside exclusive() would hold the import's last step.
    return this.seeds.importDone(name).then(() =>
      this.exclusive(async () => {
        let seeded = false;
        const existing = this.volumes.get(name);
        if (existing) {
          const here = generationOf(existing.record);
          if (existing.record.replicaOf === undefined) {
            if (generation > here) {
              // A newer generation elsewhere: this primary was superseded (its replica promoted).
              this.markSplitBrain(existing, primary, generation);
              throw new LinkProtocolError(
                'ERR_LINK_NOT_REPLICA',
                `volume ${name} is a primary here (generation ${here}), now stopped as split brain: demote it to take the mirror`,
              );
            }
            // Only a newer generation supersedes: an equal one is another primary of the name.
            if (here > generation) throw new SupersededError(name, here);
            throw new LinkProtocolError(
              'ERR_LINK_NOT_REPLICA',
              `volume ${name} is a primary here too, at the same generation ${here}`,
            );
          }
          if (generation < here) throw new SupersededError(name, here);
          if (existing.device.size !== size) await this.followResize(existing, primary, generation, size);
          // A copy imported from a seed is that seed until its first mirror: only then may
          // the primary send just what changed since the export (replica add --seeded).
          const from = existing.record.seededFrom;
          seeded = from !== undefined && seed !== undefined && from.bundleId === seed.toString('hex');
          if (existing.record.replicaOf !== primary || here !== generation || from) {
            existing.record = { ...existing.record, replicaOf: primary, generation };
            delete existing.record.seededFrom;
            this.catalog.save(this.records());
          }
        } else {
          if (!NAME.test(name))
            throw new LinkProtocolError('ERR_LINK_MALFORMED', `invalid volume name '${name}'`);
          checkSize(size);
          const record: VolumeRecord = {
            name,
            size,
            backend: 'dedup',
            readOnly: true,
            replicaOf: primary,
            generation,
            created: new Date().toISOString(),
          };
          this.volumes.set(name, this.openVolume(record));
          this.catalog.save(this.records());
          this.log.info(`volume ${name} created as a replica of gateway ${primary}`);
        }
        const store = this.store();
        return { store, volumeId: store.volumeId(name), seeded };
      }),
    );
  }

  /**
   * A replica copy whose primary now names another size: the primary was resized, and
   * the copy follows, if it is that primary's at this generation (anything else is not
   * this copy's primary talking) and no client would see it shrink under them.
   */
  private async followResize(vol: Volume, primary: string, generation: number, size: number): Promise<void> {
    const name = vol.record.name;
    const was = vol.device.size;
    if (vol.record.replicaOf !== primary || generationOf(vol.record) !== generation)
      throw new LinkProtocolError(
        'ERR_LINK_UNKNOWN_VOLUME',
        `replica of ${name} here is ${was} bytes, the primary's ${size}`,
      );
    if (size < was && vol.clients.size > 0)
      throw new LinkProtocolError(
        'ERR_LINK_UNKNOWN_VOLUME',
        `replica of ${name} here cannot shrink to ${size} bytes while ${vol.clients.size} client(s) read it`,
      );
    checkSize(size);
    await vol.device.resize(size);
    vol.record = { ...vol.record, size };
    this.catalog.save(this.records());
    this.log.info(`volume ${name}: replica copy resized to ${formatSize(size)}, as its primary was`);
  }

  mirrorRefusal(name: string, generation: number): LinkProtocolError | null {
    const v = this.volumes.get(name);
    if (!v) return new LinkProtocolError('ERR_LINK_UNKNOWN_VOLUME', `volume ${name} is gone here`);
    const here = generationOf(v.record);
    if (here > generation) return new SupersededError(name, here);
    if (v.record.replicaOf === undefined)
      return new LinkProtocolError('ERR_LINK_NOT_REPLICA', `volume ${name} is a primary here`);
    return null;
  }

  /** This primary volume met a newer generation of itself: writes stop (EPERM) until it is demoted. */
  private markSplitBrain(vol: Volume, peer: string, generation: number): void {
    if (vol.record.splitBrain && vol.record.splitBrain.generation >= generation) return;
    vol.record = { ...vol.record, splitBrain: { peer, generation, at: new Date().toISOString() } };
    this.catalog.save(this.records());
    this.log.error(
      `volume ${vol.name}: split brain: gateway ${peer} holds it at generation ${generation}, this one at ${generationOf(vol.record)}; writes refused until 'blockgate demote ${vol.name}'`,
    );
  }

  /**
   * `promote`: a replica becomes the primary of its volume, one generation up. The old
   * primary's next batch (or its next connection) is refused as superseded.
   */
  promote(name: string): Promise<VolumeInfo & { generation: number }> {
    return this.exclusive(async () => {
      const vol = this.volume(name);
      if (vol.record.replicaOf === undefined)
        throw new InvalidArgumentError(`volume '${name}' is already a primary here`);
      if (vol.clients.size > 0)
        throw new VolumeBusyError(
          `volume '${name}' has ${vol.clients.size} connected client(s); disconnect them first`,
        );
      const generation = generationOf(vol.record) + 1;
      vol.changingRole = 'promote';
      const was = vol.record.replicaOf;
      const record: VolumeRecord = { ...vol.record, readOnly: false, generation };
      delete record.replicaOf;
      try {
        await this.reopen(vol, record);
      } finally {
        vol.changingRole = null;
      }
      this.log.info(
        `volume ${name} promoted to primary at generation ${generation} (was a replica of ${was})`,
      );
      return { ...this.describe(this.volume(name)), generation };
    });
  }

  /**
   * `demote`: a primary becomes a replica (of whichever primary mirrors to it next, which
   * sends only what differs). Its present contents are kept first as a read-only volume
   * NAME.gGENERATION, so nothing it holds is lost to the resync.
   */
  demote(name: string): Promise<{ volume: string; kept: string }> {
    return this.exclusive(async () => {
      const vol = this.volume(name);
      if (vol.record.replicaOf !== undefined)
        throw new InvalidArgumentError(
          `volume '${name}' is already a replica (of gateway ${vol.record.replicaOf})`,
        );
      if (vol.record.backend !== 'dedup')
        throw new InvalidArgumentError(
          `volume '${name}' is ${vol.record.backend}: only dedup volumes are mirrored`,
        );
      if (vol.clients.size > 0)
        throw new VolumeBusyError(
          `volume '${name}' has ${vol.clients.size} connected client(s); disconnect them first`,
        );
      const kept = `${name}.g${generationOf(vol.record)}`;
      if (this.volumes.has(kept)) throw new VolumeExistsError(`volume '${kept}' exists: delete it first`);
      // From here until the swap no client may attach or write (copyVolume yields).
      vol.changingRole = 'demote';
      try {
        return await this.demoteNow(vol, kept);
      } finally {
        vol.changingRole = null;
      }
    });
  }

  /** demote's work, with the volume held from clients. */
  private async demoteNow(vol: Volume, kept: string): Promise<{ volume: string; kept: string }> {
    const name = vol.name;
    for (const m of vol.mirrors) m.close(true);
    vol.mirrors = [];
    await vol.device.flush();
    const store = this.store();
    const keptRecord: VolumeRecord = {
      name: kept,
      size: vol.record.size,
      backend: 'dedup',
      readOnly: true,
      created: new Date().toISOString(),
    };
    await store.copyVolume(store.volumeId(name), store.volumeId(kept), Math.ceil(vol.record.size / 4096));
    this.volumes.set(kept, this.openVolume(keptRecord));
    const { splitBrain } = vol.record;
    const record: VolumeRecord = {
      ...vol.record,
      readOnly: true,
      replicaOf: splitBrain?.peer ?? 'unknown',
    };
    delete record.replicas;
    delete record.splitBrain;
    await this.reopen(vol, record);
    this.log.info(`volume ${name} demoted to a replica; its contents are kept as ${kept}`);
    return { volume: name, kept };
  }

  /** Swaps a volume's record and device stack (its role changed); the catalog follows. */
  private async reopen(vol: Volume, record: VolumeRecord): Promise<void> {
    for (const m of vol.mirrors) m.close();
    await vol.device.flush();
    await vol.device.close();
    this.volumes.set(record.name, this.openVolume(record));
    this.catalog.save(this.records());
  }

  /**
   * For each pair of dedup volumes, the share of content they have in common:
   * common / max(size1, size2), common being the blocks both map to the same stored
   * block (counted as often as both hold it), from the metamaps.
   */
  async similarity(): Promise<Array<{ a: string; b: string; commonBytes: number; similarity: number }>> {
    const vols = [...this.volumes.values()].filter((v) => v.record.backend === 'dedup');
    if (vols.length < 2) return [];
    const store = this.store();
    const contents = new Map<string, Map<number, number>>();
    for (const v of vols) contents.set(v.name, await store.volumeContents(store.volumeId(v.name)));
    const out: Array<{ a: string; b: string; commonBytes: number; similarity: number }> = [];
    const names = vols.map((v) => v.name).sort();
    for (let i = 0; i < names.length; i++) {
      for (let j = i + 1; j < names.length; j++) {
        const [x, y] = [contents.get(names[i]!)!, contents.get(names[j]!)!];
        const [small, large] = x.size <= y.size ? [x, y] : [y, x];
        let common = 0;
        for (const [id, n] of small) common += Math.min(n, large.get(id) ?? 0);
        const commonBytes = common * 4096;
        const size = Math.max(
          this.volumes.get(names[i]!)!.device.size,
          this.volumes.get(names[j]!)!.device.size,
        );
        out.push({ a: names[i]!, b: names[j]!, commonBytes, similarity: size ? commonBytes / size : 0 });
      }
    }
    return out;
  }

  // ---- snapshots and clones (snapshots.ts) ------------------------------------------

  snapshotCreate(volume: string, snap: string): Promise<SnapshotInfo & { barrierMs: number }> {
    return this.exclusive(() => this.snapshots.create(volume, snap));
  }

  snapshotList(volume: string): SnapshotInfo[] {
    return this.snapshots.list(volume);
  }

  snapshotDelete(volume: string, snap: string): Promise<{ deleted: string }> {
    return this.exclusive(async () => {
      await this.snapshots.delete(volume, snap);
      return { deleted: `${volume}@${snap}` };
    });
  }

  rollback(
    volume: string,
    snap: string,
  ): Promise<{ volume: string; snapshot: string; changedBlocks: number }> {
    return this.exclusive(() => this.snapshots.rollback(volume, snap));
  }

  clone(
    source: string,
    snap: string | undefined,
    name: string,
  ): Promise<VolumeInfo & { cloneOf: string; ms: number }> {
    return this.exclusive(async () => {
      const r = await this.snapshots.clone(source, snap, name);
      return { ...this.describe(this.volume(name)), cloneOf: r.cloneOf!, ms: r.ms };
    });
  }

  seedExport(volume: string, paths: string[]): Promise<SeedExportReport> {
    return this.seeds.export(volume, paths);
  }

  seedImport(paths: string[], name: string, force: boolean): Promise<SeedImportReport> {
    return this.seeds.import(paths, name, force);
  }

  diff(
    volume: string,
    a: string,
    b?: string,
  ): { volume: string; from: string; to: string; ranges: DiffRange[]; changedBytes: number } {
    return this.snapshots.diff(volume, a, b);
  }

  /**
   * `materialize`: rewrites a dedup volume's records in block order, so a cold
   * sequential read of it issues about one read per MiB. One volume at a time.
   */
  async materialize(name: string): Promise<MaterializeReport> {
    const vol = this.volume(name);
    if (vol.record.backend !== 'dedup')
      throw new InvalidArgumentError(
        `volume '${name}' is ${vol.record.backend}: only dedup volumes are materialized`,
      );
    if (this.materializing) throw new VolumeBusyError(`volume '${this.materializing}' is being materialized`);
    this.materializing = name;
    const started = Date.now();
    try {
      const store = this.store();
      const id = store.volumeId(name);
      const blocks = Math.ceil(vol.device.size / 4096);
      const before = store.fragmentation(id, blocks).readsPerMiB;
      const moved = await store.materialize(id, blocks);
      const after = store.fragmentation(id, blocks).readsPerMiB;
      this.log.info(
        `volume ${name} materialized: ${before.toFixed(1)} -> ${after.toFixed(1)} reads per MiB, ${moved.movedBlocks} blocks moved`,
      );
      return { volume: name, before, after, ...moved, ms: Date.now() - started };
    } finally {
      this.materializing = null;
    }
  }

  /** Dedup volumes and their fragmentation (for the materialize policy). */
  fragmentations(): Array<{ name: string; readsPerMiB: number }> {
    if (!this.dedup) return [];
    const store = this.dedup;
    return [...this.volumes.values()]
      .filter((v) => v.record.backend === 'dedup')
      .map((v) => ({
        name: v.name,
        readsPerMiB: store.fragmentation(store.volumeId(v.name), Math.ceil(v.device.size / 4096)).readsPerMiB,
      }));
  }

  /** Rewrites every segment holding garbage now, rather than waiting for the background pass. */
  compact(): Promise<CompactionResult> {
    this.store();
    return this.compactor!.run(true);
  }

  /** The dedup store's figures, or null while no dedup volume was ever opened. */
  storeStats(): Promise<StoreStats | null> {
    return this.dedup ? this.dedup.stats() : Promise.resolve(null);
  }

  connectionCount(): number {
    let n = 0;
    for (const v of this.volumes.values()) n += v.clients.size;
    return n;
  }

  /** Flushes and closes every volume; for shutdown. */
  async close(): Promise<void> {
    await this.exclusive(async () => {
      for (const v of this.volumes.values()) {
        for (const m of v.mirrors) m.close();
        try {
          await v.device.flush();
        } catch (err) {
          this.log.error(`flush of ${v.name} at shutdown failed: ${(err as Error).message}`);
        }
        await v.device.close();
      }
      this.volumes.clear();
      await this.compactor?.close();
      await this.dedup?.close();
      this.dedup = null;
    });
  }
}

/** A volume's generation: 1 until a promote raises it. */
function generationOf(rec: VolumeRecord): number {
  return rec.generation ?? 1;
}

function checkSize(size: number): void {
  if (!Number.isSafeInteger(size) || size <= 0) throw new InvalidArgumentError(`invalid size ${size}`);
  if (size > MAX_SIZE)
    throw new InvalidArgumentError(`size ${formatSize(size)} exceeds the ${formatSize(MAX_SIZE)} limit`);
}
