// The registry of volumes: creates, opens, resizes and deletes them, keeps
// the catalog on disk, and knows which NBD clients use which volume.

import type { BlockDevice } from '../device/block-device';
import { toBlockError } from '../device/errors';
import {
  BackendError,
  InvalidArgumentError,
  VolumeBusyError,
  VolumeExistsError,
  VolumeNotFoundError,
} from '../errors';
import type { ClientInfo, ExportRegistry, NbdExport } from '../nbd/registry';
import type { Logger } from '../util/log';
import { formatSize } from '../util/size';
import { CompactionResult, Compactor } from '../store/compactor';
import { DedupStore, StoreOptions, StoreStats } from '../store/dedup-store';
import fs from 'node:fs';
import path from 'node:path';
import { allocatedBytes, openStack, removeBackingStore } from './backends';
import { Backend, BACKENDS, Catalog, VolumeRecord } from './catalog';

export const DEFAULT_VOLUME = 'disk0';
export const DEFAULT_VOLUME_SIZE = 8 * 2 ** 30;
export const DEFAULT_BACKEND: Backend = 'dedup';
const NAME = /^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$/;
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
  /** Dedup volumes only (volume info): what its metamap holds. */
  dedup?: { logicalBytes: number; zeroBlocks: number; exclusiveBytes: number };
}

export interface CreateOptions {
  name: string;
  size?: number;
  backend?: Backend;
  readOnly?: boolean;
  path?: string;
}

class Volume implements NbdExport {
  readonly clients = new Map<number, ClientInfo>();
  constructor(
    public record: VolumeRecord,
    readonly device: BlockDevice,
  ) {}
  get name(): string {
    return this.record.name;
  }
  get description(): string {
    return `${this.record.backend} volume, ${formatSize(this.device.size)}${this.record.readOnly ? ', read-only' : ''}`;
  }
}

export class VolumeManager implements ExportRegistry {
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

  private constructor(
    readonly dataDir: string,
    private readonly log: Logger,
    private readonly storeOptions: StoreOptions,
  ) {
    this.catalog = new Catalog(dataDir);
  }

  /** Opens every volume of the data directory; an empty directory gets the default volume. */
  static async open(dataDir: string, log: Logger, storeOptions: StoreOptions = {}): Promise<VolumeManager> {
    const m = new VolumeManager(dataDir, log, storeOptions);
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
      const known = new Set(records.filter((r) => r.backend === 'dedup').map((r) => r.name));
      for (const name of store.volumeNames()) {
        if (!known.has(name)) {
          log.warn(`store holds blocks of volume ${name}, which the catalog no longer has: releasing them`);
          await store.deleteVolume(name);
        }
      }
    }
    for (const rec of records) {
      try {
        m.volumes.set(rec.name, new Volume(rec, openStack(dataDir, rec, m.store)));
      } catch (err) {
        // One broken volume must not keep the others offline.
        log.error(`volume ${rec.name} could not be opened: ${(err as Error).message}`);
      }
    }
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
      let device: BlockDevice;
      try {
        device = openStack(this.dataDir, record, this.store);
      } catch (err) {
        throw new BackendError(`cannot create volume '${opts.name}': ${toBlockError(err, 'open').message}`);
      }
      record.size = device.size;
      const vol = new Volume(record, device);
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
    return this.exclusive(async () => {
      const vol = this.volume(name);
      if (vol.clients.size > 0) {
        throw new VolumeBusyError(
          `volume '${name}' has ${vol.clients.size} connected client(s); disconnect them first`,
        );
      }
      this.volumes.delete(name);
      this.catalog.save(this.records());
      await vol.device.close();
      removeBackingStore(this.dataDir, vol.record);
      if (vol.record.backend === 'dedup') await this.store().deleteVolume(name);
      this.log.info(`volume ${name} deleted`);
    });
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
      };
    }
    return info;
  }

  listVolumes(): VolumeInfo[] {
    return [...this.volumes.values()]
      .map((v) => this.describe(v))
      .sort((a, b) => a.name.localeCompare(b.name));
  }

  private describe(v: Volume): VolumeInfo {
    return {
      name: v.record.name,
      size: v.device.size,
      backend: v.record.backend,
      readOnly: v.record.readOnly,
      path: v.record.path ?? null,
      allocatedBytes: allocatedBytes(this.dataDir, v.record),
      clients: v.clients.size,
      created: v.record.created,
    };
  }

  // ExportRegistry: every volume is an export of the same name.

  defaultExport(): string | null {
    if (this.volumes.has(DEFAULT_VOLUME)) return DEFAULT_VOLUME;
    return this.volumes.size === 1 ? [...this.volumes.keys()][0]! : null;
  }

  list(): Array<{ name: string; description: string }> {
    return [...this.volumes.values()].map((v) => ({ name: v.name, description: v.description }));
  }

  get(name: string): NbdExport | null {
    return this.volumes.get(name) ?? null;
  }

  attach(name: string, client: ClientInfo): () => void {
    const vol = this.volume(name);
    vol.clients.set(client.id, client);
    return () => vol.clients.delete(client.id);
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

function checkSize(size: number): void {
  if (!Number.isSafeInteger(size) || size <= 0) throw new InvalidArgumentError(`invalid size ${size}`);
  if (size > MAX_SIZE)
    throw new InvalidArgumentError(`size ${formatSize(size)} exceeds the ${formatSize(MAX_SIZE)} limit`);
}
