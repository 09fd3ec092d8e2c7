// The list of volumes and their settings, persisted as one JSON file in the
// data directory, replaced atomically (write, fsync, rename, fsync the
// directory) so a crash leaves either the old list or the new one.

import fs from 'node:fs';
import path from 'node:path';

/** Volume and snapshot names: safe in file names and export names ('@' joins a volume and its snapshot). */
export const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$/;

export type Backend = 'dedup' | 'raw' | 'memory';
export const BACKENDS: readonly Backend[] = ['dedup', 'raw', 'memory'];

export interface VolumeRecord {
  name: string;
  size: number;
  backend: Backend;
  readOnly: boolean;
  /** For raw volumes on a file or block device of the operator's; absent for the gateway's own files. */
  path?: string;
  created: string;
  /** Replica gateways this (primary) volume is mirrored to. */
  replicas?: ReplicaConfig[];
  /** Set on a replica's copy: the gateway id of the primary that mirrors it here. */
  replicaOf?: string;
  /** Raised by every promote; absent means 1. A mirror of an older generation is refused. */
  generation?: number;
  /** This primary met its volume at a newer generation elsewhere: writes are refused until demote. */
  splitBrain?: { peer: string; generation: number; at: string };
  /** Point-in-time copies of this (dedup) volume, oldest first; each is the read-only export NAME@SNAP. */
  snapshots?: SnapshotRecord[];
  /** Set on a clone: the snapshot it was made from, VOL@SNAP. */
  cloneOf?: string;
  /** Seed bundles exported of this volume, each with the snapshot marking its export point. */
  seeds?: SeedRecord[];
  /** Set on a volume imported from a seed bundle until its primary's first seeded mirror. */
  seededFrom?: { bundleId: string; volume: string; gateway: string; snapshot: string };
}

export interface SeedRecord {
  bundleId: string;
  /** The snapshot taken for the export: what changed since it is what a seeded replica lacks. */
  snapshot: string;
  exportedAt: string;
  paths: string[];
}

export interface SnapshotRecord {
  name: string;
  created: string;
  /** The volume's size when the snapshot was taken. */
  size: number;
  /** Taken by `clone VOL NEW` for that clone, and deleted with it. */
  forClone?: string;
}

export interface ReplicaConfig {
  /** The replica gateway's replication listener, HOST:PORT. */
  to: string;
  mode: 'sync' | 'async';
  /** The disaster-recovery site: fed first, its lag reported on its own. */
  dr?: boolean;
  /** Bytes per second the initial sync and resyncs may send (absent: no limit). */
  maxRate?: number;
  /** replica add --seeded: the seed bundle (of this volume's seeds) the replica was imported from. */
  seed?: string;
}

interface CatalogFile {
  version: 1;
  volumes: VolumeRecord[];
}

export class Catalog {
  private readonly file: string;

  constructor(readonly dataDir: string) {
    this.file = path.join(dataDir, 'volumes.json');
  }

  exists(): boolean {
    return fs.existsSync(this.file);
  }

  load(): VolumeRecord[] {
    const parsed = JSON.parse(fs.readFileSync(this.file, 'utf8')) as CatalogFile;
    if (parsed.version !== 1 || !Array.isArray(parsed.volumes)) {
      throw new Error(`${this.file}: unknown catalog version ${String(parsed.version)}`);
    }
    return parsed.volumes;
  }

  save(volumes: VolumeRecord[]): void {
    const body: CatalogFile = { version: 1, volumes };
    const tmp = `${this.file}.tmp`;
    const fd = fs.openSync(tmp, 'w', 0o600);
    try {
      fs.writeSync(fd, JSON.stringify(body, null, 2) + '\n');
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, this.file);
    const dir = fs.openSync(this.dataDir, 'r');
    try {
      fs.fsyncSync(dir);
    } finally {
      fs.closeSync(dir);
    }
  }
}
