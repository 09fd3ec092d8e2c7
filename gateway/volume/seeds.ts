// Seed bundles as the operator sees them: `seed export` snapshots a volume (its
// export point, which also tracks every later write) and writes the snapshot
// to portable media; `seed import` on another gateway of the cluster builds a
// replica-to-be from the bundle, under a name nobody sees until it is whole.

import crypto from 'node:crypto';
import { BackendError, InvalidArgumentError, SeedError, VolumeBusyError, VolumeExistsError } from '../errors';
import { SEED_FORMAT, SeedFormatError, SeedHeader } from '../../protocol/seed/bundle';
import { exportSeed } from '../seed/seed-export';
import { importSeed, readSeedHeader } from '../seed/seed-import';
import { NAME_PATTERN, VolumeRecord } from './catalog';
import { SnapshotHost, Snapshots, snapshotExportName } from './snapshots';

export interface SeedHost extends SnapshotHost {
  /** This gateway's id on replication links (what a seeded replica will take mirrors from). */
  gatewayId(): string;
  exclusive<T>(fn: () => Promise<T>): Promise<T>;
  /** Removes a volume (and its store volume) that an import replaces. */
  remove(name: string): Promise<void>;
}

export interface SeedExportReport {
  volume: string;
  bundleId: string;
  snapshot: string;
  paths: string[];
  streamBytes: number;
  blocks: number;
  dataBlocks: number;
  uniqueBlocks: number;
  ms: number;
}

export interface SeedImportReport {
  volume: string;
  bundleId: string;
  source: { volume: string; gateway: string; exportedAt: string };
  size: number;
  uniqueBlocks: number;
  repaired: string[];
  ms: number;
}

export class Seeds {
  /** Imports under way, by volume name: a mirror that arrives for one waits for it. */
  private readonly imports = new Map<string, Promise<unknown>>();

  constructor(
    private readonly host: SeedHost,
    private readonly snapshots: Snapshots,
  ) {}

  /** Resolves once no import of `name` is running. */
  async importDone(name: string): Promise<void> {
    await this.imports.get(name)?.catch(() => undefined);
  }

  async export(volume: string, paths: string[]): Promise<SeedExportReport> {
    if (paths.length === 0) throw new InvalidArgumentError('seed export needs --to PATH (one or more)');
    if (new Set(paths).size !== paths.length) throw new InvalidArgumentError('the same --to PATH twice');
    const started = Date.now();
    const bundleId = crypto.randomBytes(16).toString('hex');
    const snap = `seed-${bundleId.slice(0, 8)}`;
    const vol = this.host.volume(volume);
    const taken = await this.host.exclusive(() => this.snapshots.create(volume, snap));
    const store = this.host.store();
    const header: SeedHeader = {
      format: SEED_FORMAT,
      bundleId,
      volume,
      size: taken.size,
      domain: store.contentDomain().toString('hex'),
      gateway: this.host.gatewayId(),
      generation: vol.record.generation ?? 1,
      snapshot: snap,
      exportedAt: new Date().toISOString(),
    };
    this.snapshots.hold(volume, snap);
    let result;
    try {
      result = await exportSeed(store, store.volumeId(snapshotExportName(volume, snap)), header, paths);
    } catch (err) {
      this.snapshots.release(volume, snap);
      await this.host.exclusive(() => this.snapshots.delete(volume, snap)).catch(() => undefined);
      const e = err as NodeJS.ErrnoException;
      if (e.code === 'EEXIST')
        throw new InvalidArgumentError(`${e.path ?? 'a --to PATH'} exists: a seed never overwrites`);
      throw new BackendError(`seed export of ${volume}: ${e.message}`);
    }
    this.snapshots.release(volume, snap);
    await this.host.exclusive(async () => {
      const v = this.host.volume(volume);
      v.record = {
        ...v.record,
        seeds: [
          ...(v.record.seeds ?? []),
          { bundleId, snapshot: snap, exportedAt: header.exportedAt, paths },
        ],
      };
      this.host.saveCatalog();
    });
    this.host.log.info(
      `volume ${volume}: seed bundle ${bundleId} written to ${paths.join(', ')} (${result.uniqueBlocks} blocks, point ${snap})`,
    );
    return { volume, bundleId, snapshot: snap, paths, ...result, ms: Date.now() - started };
  }

  async import(paths: string[], name: string, force: boolean): Promise<SeedImportReport> {
    if (paths.length === 0) throw new InvalidArgumentError('seed import needs the bundle: PATH...');
    if (!NAME_PATTERN.test(name)) throw new InvalidArgumentError(`invalid volume name '${name}'`);
    if (this.imports.has(name)) throw new VolumeBusyError(`an import into '${name}' is already running`);
    const started = Date.now();
    let header: SeedHeader;
    try {
      header = await readSeedHeader(paths);
    } catch (err) {
      throw seedError(err);
    }
    const store = this.host.store();
    if (header.domain !== store.contentDomain().toString('hex'))
      throw new SeedError(
        'foreign bundle: it was exported by a gateway of another cluster (its content-id domain differs)',
      );
    if (this.host.has(name)) {
      if (!force)
        throw new VolumeExistsError(`volume '${name}' exists: use --force to replace it with the bundle`);
      this.checkReplaceable(name);
    }
    // Under a store name no volume can have, so nothing half-imported is ever visible;
    // a crash leaves a store volume nobody names, released at the next start.
    const temp = `.seed-${header.bundleId}`;
    // The import's whole course, to its volume in the catalog: what a mirror arriving
    // for `name` meanwhile waits for (importDone).
    const whole = (async () => {
      const id = store.volumeId(temp);
      let result;
      try {
        result = await importSeed(store, paths, id, store.contentDomain());
      } catch (err) {
        await store.deleteVolume(temp);
        throw seedError(err);
      }
      try {
        await this.host.exclusive(() => this.register(name, temp, header, force));
      } catch (err) {
        if (store.volumeNames().includes(temp)) await store.deleteVolume(temp).catch(() => undefined);
        throw err;
      }
      return result;
    })();
    this.imports.set(name, whole);
    try {
      const r = await whole;
      this.host.log.info(
        `volume ${name} imported from seed bundle ${header.bundleId} (${header.volume} of gateway ${header.gateway})` +
          (r.repaired.length ? `; rebuilt from parity: ${r.repaired.join(', ')}` : ''),
      );
      return {
        volume: name,
        bundleId: header.bundleId,
        source: { volume: header.volume, gateway: header.gateway, exportedAt: header.exportedAt },
        size: header.size,
        uniqueBlocks: r.end.uniqueBlocks,
        repaired: r.repaired,
        ms: Date.now() - started,
      };
    } finally {
      this.imports.delete(name);
    }
  }

  /** The imported store volume becomes volume `name`: a read-only replica-to-be. */
  private async register(name: string, temp: string, header: SeedHeader, force: boolean): Promise<void> {
    const store = this.host.store();
    if (this.host.has(name)) {
      if (!force) throw new VolumeExistsError(`volume '${name}' was created during the import`);
      this.checkReplaceable(name);
      await this.host.remove(name);
    }
    store.renameVolume(temp, name);
    await store.flush(true);
    const rec: VolumeRecord = {
      name,
      size: header.size,
      backend: 'dedup',
      readOnly: true,
      replicaOf: header.gateway,
      generation: header.generation,
      created: new Date().toISOString(),
      seededFrom: {
        bundleId: header.bundleId,
        volume: header.volume,
        gateway: header.gateway,
        snapshot: header.snapshot,
      },
    };
    this.host.register(rec);
    this.host.saveCatalog();
  }

  private checkReplaceable(name: string): void {
    const v = this.host.volume(name);
    if (v.clients.size > 0)
      throw new VolumeBusyError(
        `volume '${name}' has ${v.clients.size} connected client(s); disconnect them first`,
      );
    if (v.record.snapshots?.length)
      throw new VolumeBusyError(`volume '${name}' has snapshots: delete them first`);
  }
}

function seedError(err: unknown): Error {
  if (err instanceof SeedFormatError) return new SeedError(err.message);
  return err as Error;
}
