// Snapshots, clones, rollback and diff of dedup volumes, as the operator sees
// them: names, the catalog, the read-only exports VOL@SNAP, and the checks
// that keep a command from changing anything when it cannot finish. The
// store does the block-level work (store/volume-tree.ts).

import { BarrierBusyError } from '../device/barrier';
import { ReadOnlyLayer } from '../device/read-only';
import {
  BackendError,
  InvalidArgumentError,
  VolumeBusyError,
  VolumeExistsError,
  VolumeNotFoundError,
} from '../errors';
import { DedupDevice } from '../store/dedup-device';
import type { DedupStore } from '../store/dedup-store';
import { TreeError } from '../store/volume-tree';
import type { Logger } from '../util/log';
import { NAME_PATTERN, SnapshotRecord, VolumeRecord } from './catalog';
import { Volume } from './volume';

/** How long a snapshot waits for the changes in flight before it gives up (and changes nothing). */
const BARRIER_TIMEOUT_MS = 5_000;
const BLOCK = 4096;

/** What the snapshot commands need of the volume manager. */
export interface SnapshotHost {
  readonly log: Logger;
  store(): DedupStore;
  volume(name: string): Volume;
  has(name: string): boolean;
  /** Opens a volume from a new record and lists it (the caller saves the catalog). */
  register(rec: VolumeRecord): Volume;
  saveCatalog(): void;
}

export interface SnapshotInfo {
  volume: string;
  name: string;
  /** The read-only NBD export of the snapshot. */
  export: string;
  size: number;
  created: string;
  /** Set on a snapshot `clone VOL NEW` took for its clone. */
  forClone: string | null;
  /** Clones made from it. */
  clones: string[];
  clients: number;
}

export interface DiffRange {
  offset: number;
  length: number;
  /** The range reads as zeroes at the newer point. */
  zero: boolean;
}

export function snapshotExportName(volume: string, snap: string): string {
  return `${volume}@${snap}`;
}

export class Snapshots {
  private readonly exports = new Map<string, Volume>();
  /** Snapshots being read by a long job (a seed export): not deleted meanwhile. */
  private readonly held = new Set<string>();

  constructor(private readonly host: SnapshotHost) {}

  /** Store volume names the catalog's snapshots use (the store keeps anything else only by mistake). */
  static storeNames(records: VolumeRecord[]): string[] {
    return records.flatMap((r) => (r.snapshots ?? []).map((s) => snapshotExportName(r.name, s.name)));
  }

  openExports(records: VolumeRecord[]): void {
    for (const r of records) for (const s of r.snapshots ?? []) this.openExport(r, s);
  }

  private openExport(rec: VolumeRecord, snap: SnapshotRecord): Volume {
    const name = snapshotExportName(rec.name, snap.name);
    const store = this.host.store();
    const record: VolumeRecord = {
      name,
      size: snap.size,
      backend: 'dedup',
      readOnly: true,
      created: snap.created,
    };
    const v = new Volume(record, new ReadOnlyLayer(new DedupDevice(store, store.volumeId(name), snap.size)));
    this.exports.set(name, v);
    return v;
  }

  /** The export of a snapshot, VOL@SNAP. */
  get(name: string): Volume | undefined {
    return this.exports.get(name);
  }

  all(): Volume[] {
    return [...this.exports.values()];
  }

  /** `snapshot create`: every write acknowledged before it is in the snapshot, none after. */
  async create(
    volume: string,
    snap: string,
    forClone?: string,
  ): Promise<SnapshotInfo & { barrierMs: number; mirroredTo: string[] }> {
    const vol = this.dedupVolume(volume);
    checkName(snap, 'snapshot');
    if ((vol.record.snapshots ?? []).some((s) => s.name === snap))
      throw new VolumeExistsError(`volume '${volume}' already has a snapshot '${snap}'`);
    const store = this.host.store();
    const name = snapshotExportName(volume, snap);
    const size = vol.device.size;
    const started = process.hrtime.bigint();
    let release: () => void;
    // Writes a restarted primary holds for its replicas' first answer (mirror.ts) count as
    // in flight at the barrier: the answers come first, within the barrier's own bound (this
    // runs in the admin queue, which the replica's answer may need on its side).
    const answers = vol.mirrors.map((m) => m.answer).filter((a): a is Promise<void> => a !== null);
    if (answers.length && !(await settlesWithin(Promise.all(answers), BARRIER_TIMEOUT_MS)))
      throw new VolumeBusyError(
        `volume '${volume}' is waiting for its replicas' first answer since the gateway started; try again`,
      );
    try {
      release = await vol.holdWrites(BARRIER_TIMEOUT_MS);
    } catch (err) {
      if (err instanceof BarrierBusyError)
        throw new VolumeBusyError(`volume '${volume}' could not be paused for a snapshot: ${err.message}`);
      throw err;
    }
    let mirroredTo: string[] = [];
    try {
      store.snapshotVolume(store.volumeId(volume), name, Math.ceil(size / BLOCK));
      // At the same point of the write order on every replica that is in sync.
      mirroredTo = vol.mirrors.filter((m) => m.snapshot(snap)).map((m) => m.address);
    } catch (err) {
      throw new BackendError(`snapshot ${name}: ${(err as Error).message}`);
    } finally {
      release();
    }
    const barrierMs = Number(process.hrtime.bigint() - started) / 1e6;
    // The store commits the snapshot before the catalog names it: a crash between the
    // two leaves a store volume nobody names, released at the next start.
    await store.flush(true);
    const record: SnapshotRecord = {
      name: snap,
      created: new Date().toISOString(),
      size,
      ...(forClone !== undefined ? { forClone } : {}),
    };
    vol.record = { ...vol.record, snapshots: [...(vol.record.snapshots ?? []), record] };
    this.host.saveCatalog();
    this.openExport(vol.record, record);
    this.host.log.info(
      `volume ${volume}: snapshot ${snap} taken (writes held for ${barrierMs.toFixed(2)} ms)`,
    );
    const missed = vol.mirrors.map((m) => m.address).filter((a) => !mirroredTo.includes(a));
    if (missed.length)
      this.host.log.warn(
        `volume ${volume}: snapshot ${snap} not taken on replica(s) ${missed.join(', ')}: not in sync`,
      );
    return { ...this.describe(vol.record, record), barrierMs, mirroredTo };
  }

  list(volume: string): SnapshotInfo[] {
    const vol = this.dedupVolume(volume);
    return (vol.record.snapshots ?? []).map((s) => this.describe(vol.record, s));
  }

  private describe(rec: VolumeRecord, s: SnapshotRecord): SnapshotInfo {
    const name = snapshotExportName(rec.name, s.name);
    const store = this.host.store();
    return {
      volume: rec.name,
      name: s.name,
      export: name,
      size: s.size,
      created: s.created,
      forClone: s.forClone ?? null,
      clones: store.dependents(store.volumeId(name)),
      clients: this.exports.get(name)?.clients.size ?? 0,
    };
  }

  hold(volume: string, snap: string): void {
    this.held.add(snapshotExportName(volume, snap));
  }

  release(volume: string, snap: string): void {
    this.held.delete(snapshotExportName(volume, snap));
  }

  /** `snapshot delete`: its references go; an older snapshot keeps what it read through it. */
  async delete(volume: string, snap: string): Promise<void> {
    const vol = this.dedupVolume(volume);
    const record = this.snapshot(vol, snap);
    const name = snapshotExportName(volume, snap);
    if (this.held.has(name)) throw new VolumeBusyError(`snapshot ${name} is being exported as a seed bundle`);
    const exp = this.exports.get(name);
    if (exp && exp.clients.size > 0)
      throw new VolumeBusyError(
        `snapshot ${name} has ${exp.clients.size} connected client(s); disconnect them first`,
      );
    const store = this.host.store();
    const clones = store.dependents(store.volumeId(name));
    if (clones.length)
      throw new VolumeBusyError(`snapshot ${name} has clones (${clones.join(', ')}): delete them first`);
    vol.record = { ...vol.record, snapshots: (vol.record.snapshots ?? []).filter((s) => s !== record) };
    this.host.saveCatalog();
    this.exports.delete(name);
    await store.deleteVolume(name);
    this.host.log.info(`volume ${volume}: snapshot ${snap} deleted`);
  }

  /** `rollback`: the volume reads as the snapshot again (size included); later snapshots stay. */
  async rollback(
    volume: string,
    snap: string,
  ): Promise<{ volume: string; snapshot: string; changedBlocks: number }> {
    const vol = this.dedupVolume(volume);
    const record = this.snapshot(vol, snap);
    if (vol.clients.size > 0)
      throw new VolumeBusyError(
        `volume '${volume}' has ${vol.clients.size} connected client(s); disconnect them first`,
      );
    if (vol.mirrors.length > 0)
      throw new InvalidArgumentError(
        `volume '${volume}' has replicas: remove them before a rollback (not mirrored yet)`,
      );
    if (vol.record.replicaOf !== undefined)
      throw new InvalidArgumentError(`volume '${volume}' is a replica: roll back its primary`);
    const store = this.host.store();
    if (vol.device.size !== record.size) await vol.device.resize(record.size);
    const changedBlocks = store.rollbackVolume(
      store.volumeId(volume),
      store.volumeId(snapshotExportName(volume, snap)),
    );
    await store.flush(true);
    vol.record = { ...vol.record, size: record.size };
    this.host.saveCatalog();
    this.host.log.info(`volume ${volume} rolled back to snapshot ${snap} (${changedBlocks} blocks)`);
    return { volume, snapshot: snap, changedBlocks };
  }

  /**
   * `clone SRC[@SNAP] NEW`: a writable volume sharing every block with the snapshot
   * (one taken now, for the clone, when none is named). No metamap or data is copied.
   */
  async clone(
    source: string,
    snap: string | undefined,
    name: string,
  ): Promise<VolumeRecord & { ms: number }> {
    const started = process.hrtime.bigint();
    checkName(name, 'volume');
    if (this.host.has(name)) throw new VolumeExistsError(`volume '${name}' already exists`);
    const vol = this.dedupVolume(source);
    let snapName = snap;
    if (snapName === undefined) {
      snapName = `clone-${name}`;
      await this.create(source, snapName, name);
    }
    const record = this.snapshot(vol, snapName);
    const store = this.host.store();
    const base = snapshotExportName(source, snapName);
    try {
      store.cloneVolume(store.volumeId(base), name, Math.ceil(record.size / BLOCK));
    } catch (err) {
      // The snapshot taken for this clone goes with it.
      if (snap === undefined) await this.delete(source, snapName).catch(() => undefined);
      if (err instanceof TreeError) throw new BackendError(`clone ${name}: ${err.message}`);
      throw err;
    }
    await store.flush(true);
    const rec: VolumeRecord = {
      name,
      size: record.size,
      backend: 'dedup',
      readOnly: false,
      created: new Date().toISOString(),
      cloneOf: base,
    };
    this.host.register(rec);
    this.host.saveCatalog();
    const ms = Number(process.hrtime.bigint() - started) / 1e6;
    this.host.log.info(`volume ${name} cloned from ${base} in ${ms.toFixed(1)} ms`);
    return { ...rec, ms };
  }

  /** After a clone is deleted: the snapshot taken for it goes too, once nothing else uses it. */
  async releaseCloneBase(clone: VolumeRecord): Promise<void> {
    if (clone.cloneOf === undefined) return;
    const at = clone.cloneOf.lastIndexOf('@');
    const source = clone.cloneOf.slice(0, at);
    const snap = clone.cloneOf.slice(at + 1);
    if (!this.host.has(source)) return;
    const rec = (this.host.volume(source).record.snapshots ?? []).find((s) => s.name === snap);
    if (rec?.forClone !== clone.name) return;
    const store = this.host.store();
    if (store.dependents(store.volumeId(clone.cloneOf)).length) return;
    await this.delete(source, snap);
  }

  /**
   * `diff VOL A [B]`: byte ranges whose contents differ between snapshot A and
   * snapshot B (the volume as it is now when B is absent), in either order.
   */
  diff(
    volume: string,
    a: string,
    b?: string,
  ): { volume: string; from: string; to: string; ranges: DiffRange[]; changedBytes: number } {
    const vol = this.dedupVolume(volume);
    const store = this.host.store();
    const point = (snap: string | undefined): { name: string; id: number; size: number } => {
      if (snap === undefined) return { name: volume, id: store.volumeId(volume), size: vol.device.size };
      const r = this.snapshot(vol, snap);
      return {
        name: snapshotExportName(volume, snap),
        id: store.volumeId(snapshotExportName(volume, snap)),
        size: r.size,
      };
    };
    const pa = point(a);
    const pb = point(b);
    const result = { volume, from: pa.name, to: pb.name, ranges: [] as DiffRange[], changedBytes: 0 };
    if (pa.id === pb.id) return result;
    const [older, newer] = store.isOlder(pa.id, pb.id) ? [pa, pb] : [pb, pa];
    const blocks = store.changedBlocks(
      older.id,
      Math.ceil(older.size / BLOCK),
      newer.id,
      Math.ceil(newer.size / BLOCK),
    );
    const end = Math.max(older.size, newer.size);
    for (const { lba, zero } of blocks) {
      const offset = lba * BLOCK;
      const length = Math.min(BLOCK, end - offset);
      const last = result.ranges[result.ranges.length - 1];
      if (last && last.offset + last.length === offset && last.zero === zero) last.length += length;
      else result.ranges.push({ offset, length, zero });
      result.changedBytes += length;
    }
    return result;
  }

  private dedupVolume(name: string): Volume {
    const vol = this.host.volume(name);
    if (vol.record.backend !== 'dedup')
      throw new InvalidArgumentError(
        `volume '${name}' is ${vol.record.backend}: snapshots and clones need a dedup volume`,
      );
    return vol;
  }

  private snapshot(vol: Volume, snap: string): SnapshotRecord {
    const r = (vol.record.snapshots ?? []).find((s) => s.name === snap);
    if (!r) throw new VolumeNotFoundError(`volume '${vol.name}' has no snapshot '${snap}'`);
    return r;
  }
}

function checkName(name: string, what: string): void {
  if (!NAME_PATTERN.test(name))
    throw new InvalidArgumentError(
      `invalid ${what} name '${name}': use letters, digits, '.', '_', '+', '-' (at most 128)`,
    );
}

/** Whether `p` settles within `ms` (the timer does not hold the process open). */
function settlesWithin(p: Promise<unknown>, ms: number): Promise<boolean> {
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), ms);
    timer.unref();
    p.then(
      () => {
        clearTimeout(timer);
        resolve(true);
      },
      () => {
        clearTimeout(timer);
        resolve(true);
      },
    );
  });
}
