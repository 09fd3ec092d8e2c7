// The deduplicating block store shared by every dedup volume of a gateway.
//
//   metamap   (volume, block) -> block id            LMDB "meta"
//   datamap   block id -> segment record, refcount   LMDB "data"
//   hash      keyed XXH3-128 -> block id             LMDB "hash"
//   segments  append-only files of lz4 records       segments.ts
//
// Crash safety: changes collect in an Overlay. A checkpoint (FLUSH, FUA, a
// timer, or a full overlay) freezes it, makes the segment files durable,
// then commits the frozen changes to LMDB and waits until they are durable
// too. After a crash the index is exactly the last checkpoint, and it never
// points at segment bytes that were not on disk first: writes since then are
// lost as from a volatile cache, but no block reads as garbage.

import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { Database, RootDatabase } from 'lmdb';
import { openIndex } from './index-db';
import { BlockError } from '../device/errors';
import { sharedBufferPool } from '../util/buffer-pool';
import type { Logger } from '../util/log';
import {
  BlockHasher,
  CorruptBlockError,
  decodeRecord,
  decodeRecordInto,
  encodeRecord,
  encodeRecordInto,
  isZeroBlock,
} from './block-codec';
import {
  BLOCK,
  DataEntry,
  RECORD_HEADER,
  ZERO_BLOCK,
  decodeDataEntry,
  decodeId,
  decodeMetaKey,
  encodeId,
  encodeMetaKey,
  metaKey,
  metaKeyLba,
  metaKeyVolume,
} from './layout';
import { HOLE, Overlay } from './overlay';
import { SegmentFiles } from './segments';
import { encodeCheckpoint } from './checkpoint-message';
import { IndexWriter } from './index-writer';

/**
 * Checkpoint at least this often while there are changes. FLUSH and FUA checkpoint
 * at once; this bounds what a crash can lose from clients that never flush (ZFS
 * commits its transaction groups on the same 5 s rhythm). Shorter intervals pin
 * sustained writes to the disk's sync speed.
 */
const CHECKPOINT_INTERVAL_MS = 5000;
/** ... and as soon as the overlay holds this many changes (bounds its memory). */
const CHECKPOINT_ENTRIES = 50_000;

export type BlockState = 'hole' | 'zero' | 'data';

interface StoreState {
  version: 1;
  secret: string;
  nextBlockId: number;
  nextVolumeId: number;
  volumes: Record<string, number>;
  uniqueBlocks: number;
  storedBytes: number;
  mappedBlocks: number;
  zeroBlocks: number;
  collisions: number;
  /** Bytes of live records per segment number (what compaction must keep). */
  segmentLive: Record<string, number>;
  /** Blocks kept at reference count zero, for the next checkpoint to delete if untouched. */
  zeroRef?: number[];
}

export interface StoreStats {
  mappedBlocks: number;
  zeroBlocks: number;
  uniqueBlocks: number;
  logicalBytes: number;
  uniqueBytes: number;
  storedBytes: number;
  segmentBytes: number;
  reclaimableBytes: number;
  dedupRatio: number;
  compressionRatio: number;
  collisions: number;
  /** Pages the index's trees use. */
  indexBytes: number;
  /** The index file, with LMDB's free pages. */
  indexFileBytes: number;
  indexBytesPerBlock: number;
}

export class DedupStore {
  private live = new Overlay();
  private frozen: Overlay | null = null;
  /**
   * Blocks a running checkpoint is deleting. Its transaction removes them at once, but
   * reads see the index as last committed until the commit lands, and a write must not
   * link to a block on its way out in between.
   */
  private dying = new Set<number>();
  /** Records whose segment write is still in flight, by block id. */
  private readonly pending = new Map<number, Buffer>();
  private readonly hasher: BlockHasher;
  private checkpointing: Promise<void> | null = null;
  private nextCheckpoint: Promise<void> | null = null;
  private readonly timer: NodeJS.Timeout;
  private closed = false;
  private readonly writer: IndexWriter;
  /** Blocks at reference count zero in the index (the writer's last word on it). */
  private zeroRef: Set<number>;

  private constructor(
    readonly dir: string,
    private readonly env: RootDatabase,
    private readonly metaDb: Database<Buffer, Buffer>,
    private readonly dataDb: Database<Buffer, Buffer>,
    private readonly hashDb: Database<Buffer, Buffer>,
    private state: StoreState,
    readonly segments: SegmentFiles,
    private readonly log: Logger,
  ) {
    this.hasher = new BlockHasher(Buffer.from(state.secret, 'base64'));
    this.writer = new IndexWriter(dir);
    this.zeroRef = new Set(state.zeroRef ?? []);
    this.timer = setInterval(() => {
      if (this.live.size > 0 && !this.checkpointing)
        this.flush().catch((e) => this.log.error(`checkpoint: ${e}`));
    }, CHECKPOINT_INTERVAL_MS);
    this.timer.unref();
  }

  static open(dir: string, log: Logger, opts: { readOnly?: boolean } = {}): DedupStore {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    const { env, meta: metaDb, data: dataDb, hash: hashDb, state: stateDb } = openIndex(dir, opts);
    let state = stateDb.get('store') as StoreState | undefined;
    if (!state) {
      if (opts.readOnly) throw new Error(`${dir} holds no dedup store`);
      state = {
        version: 1,
        secret: crypto.randomBytes(192).toString('base64'),
        nextBlockId: 1,
        nextVolumeId: 1,
        volumes: {},
        uniqueBlocks: 0,
        storedBytes: 0,
        mappedBlocks: 0,
        zeroBlocks: 0,
        collisions: 0,
        segmentLive: {},
      };
      stateDb.putSync('store', state);
    }
    state.segmentLive ??= {};
    const segments = new SegmentFiles(path.join(dir, 'segments'));
    return new DedupStore(dir, env, metaDb, dataDb, hashDb, state, segments, log);
  }

  // ---- volumes ---------------------------------------------------------------------

  /** The store's id for a volume, allocated on first use. */
  volumeId(name: string): number {
    let id = this.state.volumes[name];
    if (id === undefined) {
      id = this.state.nextVolumeId++;
      this.state.volumes[name] = id;
    }
    return id;
  }

  volumeNames(): string[] {
    return Object.keys(this.state.volumes);
  }

  /** Drops a volume's blocks from `fromLba` on (all of them for a delete). */
  async truncateVolume(volume: number, fromLba: number): Promise<void> {
    await this.flush();
    const start = encodeMetaKey(volume, fromLba);
    const end = encodeMetaKey(volume + 1, 0);
    for (const { key } of this.metaDb.getRange({ start, end })) {
      const { lba } = decodeMetaKey(key as Buffer);
      this.setMeta(metaKey(volume, lba), HOLE);
    }
    for (const k of [...this.live.meta.keys()]) {
      if (metaKeyVolume(k) === volume && metaKeyLba(k) >= fromLba) this.setMeta(k, HOLE);
    }
    await this.flush();
  }

  async deleteVolume(name: string): Promise<void> {
    const id = this.state.volumes[name];
    if (id === undefined) return;
    await this.truncateVolume(id, 0);
    delete this.state.volumes[name];
    await this.flush(true);
    await this.collect();
  }

  /** Block ids a volume maps to, with how many of its blocks map to each (zero blocks left out). */
  async volumeContents(volume: number): Promise<Map<number, number>> {
    await this.flush();
    const ids = new Map<number, number>();
    const range = this.metaDb.getRange({
      start: encodeMetaKey(volume, 0),
      end: encodeMetaKey(volume + 1, 0),
    });
    for (const { value } of range) {
      const id = decodeId(value as Buffer);
      if (id !== ZERO_BLOCK) ids.set(id, (ids.get(id) ?? 0) + 1);
    }
    return ids;
  }

  /** Per-volume figures from its metamap: blocks mapped to data, zero blocks, and blocks only it uses. */
  async volumeStats(
    volume: number,
  ): Promise<{ mappedBlocks: number; zeroBlocks: number; exclusiveBlocks: number }> {
    await this.flush();
    let mappedBlocks = 0;
    let zeroBlocks = 0;
    let exclusiveBlocks = 0;
    const range = this.metaDb.getRange({
      start: encodeMetaKey(volume, 0),
      end: encodeMetaKey(volume + 1, 0),
    });
    for (const { value } of range) {
      const id = decodeId(value as Buffer);
      if (id === ZERO_BLOCK) {
        zeroBlocks++;
        continue;
      }
      mappedBlocks++;
      if (this.lookupData(id)?.refcount === 1) exclusiveBlocks++;
    }
    return { mappedBlocks, zeroBlocks, exclusiveBlocks };
  }

  // ---- lookups: live overlay, then frozen, then the index -----------------------------

  private lookupMeta(key: number): number | undefined {
    let v = this.live.meta.get(key);
    if (v === undefined && this.frozen) v = this.frozen.meta.get(key);
    if (v !== undefined) return v === HOLE ? undefined : v;
    const b = this.metaDb.getBinary(encodeMetaKey(metaKeyVolume(key), metaKeyLba(key)));
    return b === undefined ? undefined : decodeId(b);
  }

  /** Where a block's record is now, with its committed reference count. Undefined once it is gone. */
  lookupData(id: number): DataEntry | undefined {
    if (this.dying.has(id)) return undefined;
    const e = this.live.newData.get(id) ?? this.frozen?.newData.get(id);
    if (e) return e;
    const b = this.dataDb.getBinary(encodeId(id));
    if (b === undefined) return undefined;
    const d = decodeDataEntry(b);
    const m = this.live.moved.get(id) ?? this.frozen?.moved.get(id);
    return m ? { ...d, segment: m.segment, offset: m.offset } : d;
  }

  private lookupHash(hash: Buffer, hk: string): number | undefined {
    let id = this.live.newHash.get(hk) ?? this.frozen?.newHash.get(hk);
    if (id === undefined) {
      const b = this.hashDb.getBinary(hash);
      id = b === undefined ? undefined : decodeId(b);
    }
    return id === undefined || this.dying.has(id) ? undefined : id;
  }

  /** Points a metamap entry somewhere new and moves the references with it. */
  private setMeta(key: number, value: number): void {
    const old = this.lookupMeta(key);
    if (old === value) return;
    if (old !== undefined && old !== ZERO_BLOCK) {
      this.live.addRef(old, -1);
      this.state.mappedBlocks--;
    } else if (old === ZERO_BLOCK) this.state.zeroBlocks--;
    if (value !== HOLE && value !== ZERO_BLOCK) {
      this.live.addRef(value, 1);
      this.state.mappedBlocks++;
    } else if (value === ZERO_BLOCK) this.state.zeroBlocks++;
    this.live.meta.set(key, value);
    if (this.live.size >= CHECKPOINT_ENTRIES && !this.checkpointing) {
      this.flush().catch((e) => this.log.error(`checkpoint: ${e}`));
    }
  }

  // ---- blocks ----------------------------------------------------------------------

  /** States of `count` blocks from `lba`: one range scan of the index, then the overlays. */
  blockStates(volume: number, lba: number, count: number): BlockState[] {
    const states: BlockState[] = new Array<BlockState>(count).fill('hole');
    const range = this.metaDb.getRange({
      start: encodeMetaKey(volume, lba),
      end: encodeMetaKey(volume, lba + count),
    });
    for (const { key, value } of range) {
      const at = decodeMetaKey(key as Buffer).lba - lba;
      states[at] = decodeId(value as Buffer) === ZERO_BLOCK ? 'zero' : 'data';
    }
    for (const overlay of [this.frozen, this.live]) {
      if (!overlay) continue;
      for (const [k, v] of overlay.meta) {
        if (metaKeyVolume(k) !== volume) continue;
        const at = metaKeyLba(k) - lba;
        if (at < 0 || at >= count) continue;
        states[at] = v === HOLE ? 'hole' : v === ZERO_BLOCK ? 'zero' : 'data';
      }
    }
    return states;
  }

  /** The block's 4 KiB, or null where it reads as zeroes. EIO if its stored copy is damaged. */
  async readBlock(volume: number, lba: number): Promise<Buffer | null> {
    const id = this.lookupMeta(metaKey(volume, lba));
    if (id === undefined || id === ZERO_BLOCK) return null;
    try {
      return await this.readStored(id);
    } catch (err) {
      if (err instanceof CorruptBlockError) {
        this.log.error(`volume ${this.volumeName(volume)} block ${lba}: ${err.message}`);
        throw new BlockError('EIO', `block ${lba} is damaged: ${err.message}`);
      }
      throw err;
    }
  }

  private volumeName(volume: number): string {
    return Object.entries(this.state.volumes).find(([, id]) => id === volume)?.[0] ?? `#${volume}`;
  }

  /**
   * Reads `count` whole blocks from `lba` into `into` (count * 4 KiB): one metamap range
   * scan, and one pread for each run of records lying next to each other in a segment
   * (blocks written together sit together), each decoded straight into place.
   */
  async readBlocks(volume: number, lba: number, count: number, into: Buffer): Promise<void> {
    const ids = this.blockIds(volume, lba, count);
    interface Item {
      at: number;
      id: number;
      entry: DataEntry;
    }
    const runs: Item[][] = [];
    const singles: Promise<void>[] = [];
    let run: Item[] = [];
    let runEnd = -1;
    let runSegment = -1;
    for (let i = 0; i < count; i++) {
      const id = ids[i]!;
      if (id === undefined || id === ZERO_BLOCK) {
        into.fill(0, i * BLOCK, (i + 1) * BLOCK);
        continue;
      }
      const pendingRecord = this.pending.get(id);
      const entry = this.lookupData(id);
      if (!entry || pendingRecord) {
        // Rare: in flight to its segment, or missing (reported by the single-block path).
        const at = i * BLOCK;
        singles.push(
          this.readBlock(volume, lba + i).then((block) => {
            if (block) block.copy(into, at);
            else into.fill(0, at, at + BLOCK);
          }),
        );
        continue;
      }
      const item = { at: i * BLOCK, id, entry };
      if (entry.segment === runSegment && entry.offset === runEnd && run.length < 256) run.push(item);
      else {
        if (run.length) runs.push(run);
        run = [item];
        runSegment = entry.segment;
      }
      runEnd = entry.offset + RECORD_HEADER + entry.storedLength;
    }
    if (run.length) runs.push(run);
    await Promise.all([
      ...singles,
      ...runs.map(async (r) => {
        const first = r[0]!.entry;
        const last = r[r.length - 1]!.entry;
        const length = last.offset + RECORD_HEADER + last.storedLength - first.offset;
        const pooled = length >= sharedBufferPool.minSize;
        const buf = await this.segments.read(
          first.segment,
          first.offset,
          length,
          pooled ? sharedBufferPool.acquire(length) : undefined,
        );
        for (const { at, id, entry } of r) {
          const rec = buf.subarray(
            entry.offset - first.offset,
            entry.offset - first.offset + RECORD_HEADER + entry.storedLength,
          );
          try {
            decodeRecordInto(rec, id, entry.hash, this.hasher, into.subarray(at, at + BLOCK));
          } catch (err) {
            if (!(err instanceof CorruptBlockError)) throw err;
            const blk = lba + at / BLOCK;
            this.log.error(`volume ${this.volumeName(volume)} block ${blk}: ${err.message}`);
            throw new BlockError('EIO', `block ${blk} is damaged: ${err.message}`);
          }
        }
        if (pooled) sharedBufferPool.release(buf);
      }),
    ]);
  }

  /** Block ids of `count` blocks from `lba` (undefined: hole): one range scan, then the overlays. */
  private blockIds(volume: number, lba: number, count: number): Array<number | undefined> {
    const ids = new Array<number | undefined>(count);
    if (count === 1) {
      ids[0] = this.lookupMeta(metaKey(volume, lba));
      return ids;
    }
    const range = this.metaDb.getRange({
      start: encodeMetaKey(volume, lba),
      end: encodeMetaKey(volume, lba + count),
    });
    for (const { key, value } of range)
      ids[decodeMetaKey(key as Buffer).lba - lba] = decodeId(value as Buffer);
    for (const overlay of [this.frozen, this.live]) {
      if (!overlay || overlay.meta.size === 0) continue;
      // Probe the overlay per block: it is a hash map, and the request is short.
      for (let i = 0; i < count; i++) {
        const v = overlay.meta.get(metaKey(volume, lba + i));
        if (v !== undefined) ids[i] = v === HOLE ? undefined : v;
      }
    }
    return ids;
  }

  private async readStored(id: number): Promise<Buffer> {
    const entry = this.lookupData(id);
    if (!entry) throw new CorruptBlockError(`block ${id} has no datamap entry`);
    const rec =
      this.pending.get(id) ??
      (await this.segments.read(entry.segment, entry.offset, RECORD_HEADER + entry.storedLength));
    return decodeRecord(rec, id, entry.hash, this.hasher);
  }

  /** Stores one 4 KiB block at (volume, lba): shared if its bytes are already stored, else appended. */
  async writeBlock(volume: number, lba: number, block: Buffer): Promise<void> {
    const key = metaKey(volume, lba);
    if (isZeroBlock(block)) return this.setMeta(key, ZERO_BLOCK);
    const hash = this.hasher.hash(block);
    const hk = hash.toString('latin1');
    const candidate = this.lookupHash(hash, hk);
    if (candidate !== undefined) {
      // Held while comparing, so the candidate cannot be reclaimed under us.
      this.live.addRef(candidate, 1);
      let same = false;
      try {
        same = (await this.readStored(candidate)).equals(block);
      } catch (err) {
        if (!(err instanceof CorruptBlockError)) {
          this.live.addRef(candidate, -1);
          throw err;
        }
      }
      this.live.addRef(candidate, -1);
      if (same) return this.setMeta(key, candidate);
      this.state.collisions++;
      this.log.warn(`hash match without equal bytes for block ${candidate}; storing a separate copy`);
    }
    const id = this.state.nextBlockId++;
    const record = encodeRecord(id, block, hash);
    const { segment, offset, written } = this.segments.append(record);
    const entry: DataEntry = {
      segment,
      offset,
      storedLength: record.length - RECORD_HEADER,
      flags: record.readUInt16BE(4),
      refcount: 0,
      hash,
    };
    this.pending.set(id, record);
    this.live.newData.set(id, entry);
    if (candidate === undefined) this.live.newHash.set(hk, id);
    this.setMeta(key, id);
    try {
      await written;
    } catch (err) {
      // Undo: the block never reached its segment, so nothing may point at it.
      if (this.lookupMeta(key) === id) this.setMeta(key, HOLE);
      if (this.live.newHash.get(hk) === id) this.live.newHash.delete(hk);
      throw err;
    } finally {
      this.pending.delete(id);
    }
  }

  /**
   * Copies a live block's record (as read from its old segment) to the end of the
   * current one; the move becomes permanent at the next checkpoint. The block id,
   * and so every metamap entry, stays the same.
   */
  async relocate(id: number, record: Buffer): Promise<void> {
    const { segment, offset, written } = this.segments.append(record);
    this.pending.set(id, record);
    this.live.moved.set(id, { segment, offset });
    try {
      await written;
    } catch (err) {
      this.live.moved.delete(id);
      throw err;
    } finally {
      this.pending.delete(id);
    }
  }

  /** Bytes of live records per segment, as of the last checkpoint. */
  segmentLiveBytes(segment: number): number {
    return this.state.segmentLive[segment] ?? 0;
  }

  /**
   * Stores whole blocks at lba.. from `data` (a multiple of 4 KiB). New blocks are
   * encoded into one buffer and appended with one write; zero blocks, repeats within
   * the request and hash hits (compared byte for byte) are linked instead.
   */
  async writeBlocks(volume: number, lba: number, data: Buffer): Promise<void> {
    const count = data.length / BLOCK;
    const slab = Buffer.allocUnsafe(count * (RECORD_HEADER + BLOCK));
    let used = 0;
    interface Fresh {
      key: number;
      /** Its index in the request. */
      index: number;
      id: number;
      at: number;
      length: number;
      hash: Buffer;
      hk: string;
      indexed: boolean;
    }
    const fresh: Fresh[] = [];
    const repeats: Array<{ key: number; of: Fresh }> = [];
    const local = new Map<string, Fresh>();
    const hits: Promise<void>[] = [];
    for (let i = 0; i < count; i++) {
      const block = data.subarray(i * BLOCK, (i + 1) * BLOCK);
      const key = metaKey(volume, lba + i);
      if (isZeroBlock(block)) {
        this.setMeta(key, ZERO_BLOCK);
        continue;
      }
      const hash = this.hasher.hash(block);
      const hk = hash.toString('latin1');
      const earlier = local.get(hk);
      if (earlier && data.subarray(earlier.index * BLOCK, (earlier.index + 1) * BLOCK).equals(block)) {
        repeats.push({ key, of: earlier });
        continue;
      }
      if (this.lookupHash(hash, hk) !== undefined) {
        // Already stored (or being stored): the single-block path compares and links.
        hits.push(this.writeBlock(volume, lba + i, block)); // awaited before the request settles
        continue;
      }
      const id = this.state.nextBlockId++;
      const length = encodeRecordInto(id, block, hash, slab, used);
      // A hash shared with an earlier, different block of this request: a collision, stored apart.
      if (earlier) this.state.collisions++;
      const f: Fresh = { key, index: i, id, at: used, length, hash, hk, indexed: !earlier };
      used += length;
      fresh.push(f);
      if (!earlier) local.set(hk, f);
    }
    if (fresh.length === 0) {
      await Promise.all(hits);
      return;
    }
    const records = slab.subarray(0, used);
    const { segment, offset, written } = this.segments.append(records);
    for (const f of fresh) {
      const rec = records.subarray(f.at, f.at + f.length);
      this.pending.set(f.id, rec);
      this.live.newData.set(f.id, {
        segment,
        offset: offset + f.at,
        storedLength: f.length - RECORD_HEADER,
        flags: rec.readUInt16BE(4),
        refcount: 0,
        hash: f.hash,
      });
      if (f.indexed) this.live.newHash.set(f.hk, f.id);
      this.setMeta(f.key, f.id);
    }
    for (const r of repeats) this.setMeta(r.key, r.of.id);
    try {
      await written;
    } catch (err) {
      for (const f of fresh) {
        if (this.lookupMeta(f.key) === f.id) this.setMeta(f.key, HOLE);
        if (this.live.newHash.get(f.hk) === f.id) this.live.newHash.delete(f.hk);
      }
      for (const r of repeats) if (this.lookupMeta(r.key) === r.of.id) this.setMeta(r.key, HOLE);
      throw err;
    } finally {
      for (const f of fresh) this.pending.delete(f.id);
    }
    await Promise.all(hits);
  }

  /** Makes the block a hole (never written) or a zero block. */
  discardBlock(volume: number, lba: number, asZero: boolean): void {
    this.setMeta(metaKey(volume, lba), asZero ? ZERO_BLOCK : HOLE);
  }

  // ---- checkpoints -------------------------------------------------------------------

  /**
   * Makes every write completed before the call durable. Calls made while a
   * checkpoint runs share the next one (group commit).
   */
  flush(stateChanged = false): Promise<void> {
    if (this.closed) return Promise.resolve();
    if (!this.checkpointing) {
      if (this.live.size === 0 && !stateChanged) return Promise.resolve();
      this.checkpointing = this.checkpoint().finally(() => (this.checkpointing = null));
      return this.checkpointing;
    }
    this.nextCheckpoint ??= this.checkpointing
      .catch(() => undefined)
      .then(() => {
        this.nextCheckpoint = null;
        return this.flush(true);
      });
    return this.nextCheckpoint;
  }

  private async checkpoint(): Promise<void> {
    const frozen = this.live;
    this.frozen = frozen;
    this.live = new Overlay();
    // From this instant nothing may link to a block the writer could delete: blocks it
    // left at zero that this epoch did not touch, and blocks born and released in it.
    const dying: number[] = [];
    for (const id of this.zeroRef) if (!frozen.refDelta.has(id) && !frozen.moved.has(id)) dying.push(id);
    for (const id of dying) this.dying.add(id);
    for (const id of frozen.newData.keys()) if ((frozen.refDelta.get(id) ?? 0) <= 0) this.dying.add(id);
    // The writer owns the counters it changes (blocks, bytes, segments); the rest is ours.
    const s = this.state;
    const owned = {
      version: s.version,
      secret: s.secret,
      nextBlockId: s.nextBlockId,
      nextVolumeId: s.nextVolumeId,
      volumes: s.volumes,
      mappedBlocks: s.mappedBlocks,
      zeroBlocks: s.zeroBlocks,
      collisions: s.collisions,
    };
    try {
      await this.segments.sync();
      const started = process.hrtime.bigint();
      const reply = await this.writer.commit(encodeCheckpoint(frozen, dying, JSON.stringify(owned)));
      this.log.debug(
        `checkpoint: ${frozen.size} changes committed in ${(Number(process.hrtime.bigint() - started) / 1e6).toFixed(1)} ms`,
      );
      if (reply.missing.length) {
        this.log.error(`checkpoint: references to missing blocks ${reply.missing.slice(0, 10).join(', ')}`);
      }
      this.state.uniqueBlocks = reply.counters.uniqueBlocks;
      this.state.storedBytes = reply.counters.storedBytes;
      this.state.segmentLive = reply.counters.segmentLive;
      this.zeroRef = new Set(reply.zeroRef);
      // Reads on this thread now see the writer's commit.
      this.env.resetReadTxn();
    } catch (err) {
      // Nothing was lost from memory: fold the frozen changes back under the live ones.
      this.merge(frozen);
      throw err;
    } finally {
      this.frozen = null;
      this.dying = new Set();
    }
  }

  private merge(frozen: Overlay): void {
    const live = this.live;
    this.live = frozen;
    for (const [k, v] of live.meta) frozen.meta.set(k, v);
    for (const [id, e] of live.newData) frozen.newData.set(id, e);
    for (const [hk, id] of live.newHash) frozen.newHash.set(hk, id);
    for (const [id, d] of live.refDelta) frozen.addRef(id, d);
    for (const [id, m] of live.moved) frozen.moved.set(id, m);
  }

  // ---- stats and shutdown ----------------------------------------------------------------

  /**
   * Flushes, then deletes every block whose reference count is zero (a checkpoint
   * deletes such a block only when the one before left it at zero untouched).
   */
  async collect(): Promise<void> {
    await this.flush();
    if (this.zeroRef.size > 0) await this.flush(true);
  }

  /** Figures for everything acknowledged so far, with released blocks gone. */
  async stats(): Promise<StoreStats> {
    await this.collect();
    const s = this.state;
    const segmentBytes = this.segments.totalBytes();
    // Pages the three trees use: the file also holds LMDB's copy-on-write free pages.
    let indexBytes = 0;
    for (const db of [this.metaDb, this.dataDb, this.hashDb]) {
      const st = db.getStats() as {
        pageSize: number;
        treeBranchPageCount: number;
        treeLeafPageCount: number;
        overflowPages: number;
      };
      indexBytes += st.pageSize * (st.treeBranchPageCount + st.treeLeafPageCount + st.overflowPages);
    }
    const indexFileBytes = fs.statSync(path.join(this.dir, 'index', 'data.mdb')).size;
    const uniqueBytes = s.uniqueBlocks * BLOCK;
    const logicalBytes = s.mappedBlocks * BLOCK;
    return {
      mappedBlocks: s.mappedBlocks,
      zeroBlocks: s.zeroBlocks,
      uniqueBlocks: s.uniqueBlocks,
      logicalBytes,
      uniqueBytes,
      storedBytes: s.storedBytes,
      segmentBytes,
      reclaimableBytes: Math.max(0, segmentBytes - s.storedBytes),
      dedupRatio: uniqueBytes ? logicalBytes / uniqueBytes : 1,
      compressionRatio: s.storedBytes ? uniqueBytes / s.storedBytes : 1,
      collisions: s.collisions,
      indexBytes,
      indexFileBytes,
      indexBytesPerBlock: s.uniqueBlocks ? Math.round(indexBytes / s.uniqueBlocks) : 0,
    };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await this.flush(true);
    this.closed = true;
    clearInterval(this.timer);
    await this.writer.close();
    await this.env.close();
    this.segments.close();
  }
}
