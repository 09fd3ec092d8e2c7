// Writes a seed bundle's stream across its target files: units of UNIT bytes
// in rows over the data shards, each row's XOR parity on the last shard
// (when there is more than one), every unit with its checksum. The headers
// are rewritten at the end with the stream's length and marked complete.

import fs from 'node:fs/promises';
import {
  SHARD_HEADER_BYTES,
  SHARD_MAGIC,
  SHARD_VERSION,
  UNIT,
  UNIT_RECORD,
  dataShards,
  encodeShardHeader,
  unitChecksum,
  xorInto,
} from '../../protocol/seed/bundle';

export class ShardWriter {
  private readonly k: number;
  /** The current row's data units; `fill` bytes of the current one are used. */
  private readonly row: Buffer[];
  private unitInRow = 0;
  private fill = 0;
  private rows = 0;
  private streamBytes = 0;

  private constructor(
    private readonly paths: string[],
    private readonly files: fs.FileHandle[],
    private readonly bundleId: string,
  ) {
    this.k = dataShards(paths.length);
    this.row = Array.from({ length: this.k }, () => Buffer.alloc(UNIT));
  }

  /** Creates the target files; refuses any that exists (a seed never overwrites). */
  static async create(paths: string[], bundleId: string): Promise<ShardWriter> {
    const files: fs.FileHandle[] = [];
    try {
      for (const p of paths) files.push(await fs.open(p, 'wx', 0o600));
    } catch (err) {
      await Promise.all(files.map((f) => f.close()));
      await Promise.all(paths.slice(0, files.length).map((p) => fs.rm(p, { force: true })));
      throw err;
    }
    const w = new ShardWriter(paths, files, bundleId);
    await w.writeHeaders(false);
    return w;
  }

  async write(data: Buffer): Promise<void> {
    for (let at = 0; at < data.length;) {
      const n = Math.min(UNIT - this.fill, data.length - at);
      data.copy(this.row[this.unitInRow]!, this.fill, at, at + n);
      this.fill += n;
      at += n;
      this.streamBytes += n;
      if (this.fill === UNIT) {
        this.fill = 0;
        if (++this.unitInRow === this.k) await this.flushRow();
      }
    }
  }

  /** Pads and writes the last row, then the final headers; everything is fsynced. */
  async finish(): Promise<number> {
    if (this.fill > 0 || this.unitInRow > 0) {
      this.row[this.unitInRow]!.fill(0, this.fill);
      for (let i = this.unitInRow + 1; i < this.k; i++) this.row[i]!.fill(0);
      await this.flushRow();
    }
    await this.writeHeaders(true);
    await Promise.all(this.files.map((f) => f.sync()));
    await Promise.all(this.files.map((f) => f.close()));
    return this.streamBytes;
  }

  /** Removes the half-written files. */
  async abort(): Promise<void> {
    await Promise.all(this.files.map((f) => f.close().catch(() => undefined)));
    await Promise.all(this.paths.map((p) => fs.rm(p, { force: true })));
  }

  private async flushRow(): Promise<void> {
    const at = SHARD_HEADER_BYTES + this.rows * UNIT_RECORD;
    const writes: Promise<unknown>[] = [];
    for (let i = 0; i < this.k; i++) writes.push(this.writeUnit(this.files[i]!, at, this.row[i]!));
    if (this.files.length > 1) {
      const parity = Buffer.alloc(UNIT);
      for (const u of this.row) xorInto(parity, u);
      writes.push(this.writeUnit(this.files[this.k]!, at, parity));
    }
    await Promise.all(writes);
    this.rows++;
    this.unitInRow = 0;
  }

  private async writeUnit(file: fs.FileHandle, at: number, unit: Buffer): Promise<void> {
    await file.write(unitChecksum(unit), 0, 32, at);
    await file.write(unit, 0, UNIT, at + 32);
  }

  private async writeHeaders(complete: boolean): Promise<void> {
    await Promise.all(
      this.files.map((f, shard) =>
        f.write(
          encodeShardHeader({
            magic: SHARD_MAGIC,
            version: SHARD_VERSION,
            bundleId: this.bundleId,
            shard,
            shards: this.files.length,
            unit: UNIT,
            streamBytes: complete ? this.streamBytes : 0,
            complete,
          }),
          0,
          SHARD_HEADER_BYTES,
          0,
        ),
      ),
    );
  }
}
