// Reads a seed bundle's stream back from the files given, in any order: checks
// that they are shards of one complete bundle, verifies every unit's checksum,
// and rebuilds a unit that is missing or damaged from the rest of its row
// (its parity), so any one lost or damaged device is survived. Errors name
// the file and the part that is wrong.

import fs from 'node:fs/promises';
import {
  SHARD_HEADER_BYTES,
  SeedFormatError,
  ShardHeader,
  UNIT,
  UNIT_RECORD,
  dataShards,
  decodeShardHeader,
  unitChecksum,
  xorInto,
} from '../../protocol/seed/bundle';

interface Shard {
  path: string;
  file: fs.FileHandle;
  header: ShardHeader;
}

export class ShardSet {
  private constructor(
    /** By shard index; null for a shard not given. */
    private readonly shards: Array<Shard | null>,
    readonly bundleId: string,
    readonly streamBytes: number,
  ) {}

  static async open(paths: string[]): Promise<ShardSet> {
    const opened: Shard[] = [];
    try {
      for (const path of paths) {
        const file = await fs.open(path, 'r').catch((err: NodeJS.ErrnoException) => {
          throw new SeedFormatError(`${path}: ${err.code === 'ENOENT' ? 'no such file' : err.message}`);
        });
        const head = Buffer.alloc(SHARD_HEADER_BYTES);
        const { bytesRead } = await file.read(head, 0, SHARD_HEADER_BYTES, 0);
        if (bytesRead < SHARD_HEADER_BYTES) {
          await file.close();
          throw new SeedFormatError(`${path}: not a blockgate seed bundle (too short)`);
        }
        let header: ShardHeader;
        try {
          header = decodeShardHeader(head, path);
        } catch (err) {
          await file.close();
          throw err;
        }
        opened.push({ path, file, header });
        if (!header.complete)
          throw new SeedFormatError(`${path}: the export that wrote it did not finish (incomplete bundle)`);
      }
      const first = opened[0]!.header;
      const shards: Array<Shard | null> = Array.from({ length: first.shards }, () => null);
      for (const s of opened) {
        const h = s.header;
        if (h.bundleId !== first.bundleId)
          throw new SeedFormatError(
            `${s.path} belongs to bundle ${h.bundleId}, ${opened[0]!.path} to ${first.bundleId}`,
          );
        if (h.shards !== first.shards || h.streamBytes !== first.streamBytes)
          throw new SeedFormatError(`${s.path}: its header disagrees with ${opened[0]!.path}'s`);
        if (shards[h.shard])
          throw new SeedFormatError(`${s.path} and ${shards[h.shard]!.path} are both shard ${h.shard}`);
        shards[h.shard] = s;
      }
      const missing = shards.flatMap((s, i) => (s ? [] : [i]));
      const spare = first.shards === 1 ? 0 : 1;
      if (missing.length > spare)
        throw new SeedFormatError(
          `bundle ${first.bundleId} has ${first.shards} part(s); shard(s) ${missing.join(', ')} missing, ` +
            `at least ${first.shards - spare} are needed`,
        );
      return new ShardSet(shards, first.bundleId, first.streamBytes);
    } catch (err) {
      await Promise.all(opened.map((s) => s.file.close().catch(() => undefined)));
      throw err;
    }
  }

  /** Units repaired from parity while reading, with where. */
  readonly repaired: string[] = [];

  /** The stream, a unit at a time, each checked (and rebuilt where it must be). */
  async *stream(): AsyncGenerator<Buffer> {
    const n = this.shards.length;
    const k = dataShards(n);
    const units = Math.ceil(this.streamBytes / UNIT);
    const rows = Math.ceil(units / k);
    let left = this.streamBytes;
    for (let r = 0; r < rows; r++) {
      const got = await Promise.all(
        this.shards.map((s) => (s ? this.readUnit(s, r) : Promise.resolve(null))),
      );
      const bad = got.flatMap((u, i) => (u ? [] : [i]));
      if (bad.length > (n === 1 ? 0 : 1)) {
        const names = bad.map((i) => this.shards[i]?.path ?? `shard ${i} (not given)`);
        throw new SeedFormatError(
          `row ${r} of the bundle is damaged in ${names.join(' and ')}: cannot rebuild it`,
        );
      }
      if (bad.length === 1 && bad[0]! < k) {
        const i = bad[0]!;
        const rebuilt = Buffer.alloc(UNIT);
        for (let j = 0; j < n; j++) if (j !== i) xorInto(rebuilt, got[j]!);
        got[i] = rebuilt;
        this.repaired.push(`row ${r} of ${this.shards[i]?.path ?? `shard ${i}`}`);
      }
      for (let i = 0; i < k && left > 0; i++) {
        const take = Math.min(UNIT, left);
        left -= take;
        yield got[i]!.subarray(0, take);
      }
    }
  }

  /** Row `r` of a shard, or null when it is short or its checksum is wrong. */
  private async readUnit(s: Shard, r: number): Promise<Buffer | null> {
    const rec = Buffer.alloc(UNIT_RECORD);
    const { bytesRead } = await s.file.read(rec, 0, UNIT_RECORD, SHARD_HEADER_BYTES + r * UNIT_RECORD);
    if (bytesRead < UNIT_RECORD) return null;
    const unit = rec.subarray(32);
    return unitChecksum(unit).equals(rec.subarray(0, 32)) ? unit : null;
  }

  async close(): Promise<void> {
    await Promise.all(this.shards.map((s) => s?.file.close().catch(() => undefined)));
  }
}
