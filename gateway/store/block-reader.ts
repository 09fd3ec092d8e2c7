// The read path of the dedup store: metamap -> datamap -> segment record -> the
// block's 4 KiB, checked against its content hash on every read. Single blocks
// come from the page cache without a promise chain where they can; long reads
// go one pread per run of neighbouring records, decoded on the libuv pool.
// The store (dedup-store.ts) owns the maps and overlays; this module only reads
// through the view it is given.

import { BlockError } from '../device/errors';
import type { Logger } from '../util/log';
import { sharedBufferPool } from '../util/buffer-pool';
import { settleAll } from '../util/settle-all';
import {
  BlockHasher,
  CorruptBlockError,
  decodeError,
  decodeRecord,
  decodeRecordAt,
  decodeRecordInto,
} from './block-codec';
import { BLOCK, DataEntry, RECORD_HEADER, ZERO_BLOCK, metaKey } from './layout';
import { META_PAGE, MetaPage, packPlace, placeOffset, placeSegment } from './meta-cache';
import { MetaPageError, metaPageDamaged } from './meta-pages';
import { HOLE } from './overlay';
import type { PendingRecords } from './pending-records';
import type { SegmentFiles } from './segments';

const RESOLVED = Promise.resolve();

/** What the reader needs of the store: its files, and lookups through its overlays. */
export interface StoreView {
  readonly segments: SegmentFiles;
  readonly hasher: BlockHasher;
  /** Records whose segment writes are in flight (read from memory meanwhile). */
  readonly pending: PendingRecords;
  readonly log: Logger;
  /** Whether the metamap page cache is on (metaPage then always answers). */
  cacheEnabled(): boolean;
  /** A snapshot or clone, which reads through its parents (its pages hold its own entries only). */
  linked(volume: number): boolean;
  metaPage(key: number): MetaPage | undefined;
  /** Whether the block's cached entry comes from a damaged page of the tree (its reads fail). */
  metaDamaged(key: number): boolean;
  /** Whether any page of the tree has been found damaged (metaDamaged can say yes at all). */
  anyMetaDamaged(): boolean;
  resolveMeta(volume: number, lba: number): number | undefined;
  lookupData(id: number): DataEntry | undefined;
  /** Block ids of `count` blocks from `lba` without the page cache (undefined: hole). */
  blockIds(volume: number, lba: number, count: number): Array<number | undefined>;
  volumeName(volume: number): string;
}

/**
 * Runs of at least this many records are read and decoded on the libuv pool, in one
 * job (decodeRecords with the segment's descriptor): below it the hand-off costs more
 * than the copy and the decoding it moves off the event loop.
 */
const POOL_DECODE_MIN = 64;

/** Where a record header holds its block's hash. */
const RECORD_HASH_AT = 24;

/**
 * Remembers where a block's record was found, once a read has checked it against
 * the datamap: its contents hashed as the datamap says, and so does its header,
 * which later reads from this place check the contents against.
 */
function notePlace(
  page: MetaPage,
  i: number,
  entry: { segment: number; offset: number; storedLength: number; hash: Buffer | null },
  rec: Buffer,
  recAt = 0,
): void {
  if (!entry.hash) return;
  const at = recAt + RECORD_HASH_AT;
  if (rec.compare(entry.hash, 0, 16, at, at + 16) !== 0) return;
  page.places[i] = packPlace(entry.segment, entry.offset);
  page.lengths[i] = entry.storedLength;
}

/** A block of a multi-block read, where its record is. */
interface RunItem {
  /** Byte offset in the read. */
  at: number;
  id: number;
  segment: number;
  offset: number;
  storedLength: number;
  /** The datamap's hash; null for a place the page remembered (the header's hash). */
  hash: Buffer | null;
  page: MetaPage | undefined;
  /** The block's index in its page. */
  i: number;
}

export class BlockReader {
  private readonly recordScratch = Buffer.allocUnsafe(RECORD_HEADER + BLOCK);

  constructor(private readonly view: StoreView) {}

  /** The block's 4 KiB, or null where it reads as zeroes. EIO if its stored copy is damaged. */
  async readBlock(volume: number, lba: number): Promise<Buffer | null> {
    try {
      const id = this.view.resolveMeta(volume, lba);
      if (id === undefined || id === ZERO_BLOCK) return null;
      return await this.readStored(id);
    } catch (err) {
      throw this.damaged(volume, lba, err);
    }
  }

  /**
   * One whole block into `into`. Settles at once when its record is in the page
   * cache, the common case: no promise chain, no allocation.
   */
  readBlockInto(volume: number, lba: number, into: Buffer): Promise<void> {
    const key = metaKey(volume, lba);
    let page: MetaPage | undefined;
    let id: number;
    const i = key % META_PAGE;
    try {
      // A linked volume's pages hold its own entries only: it reads through its parent.
      page = this.view.linked(volume) ? undefined : this.view.metaPage(key);
      if (page && this.view.metaDamaged(key)) throw metaPageDamaged(volume, lba);
      id = page ? page.ids[i]! : (this.view.resolveMeta(volume, lba) ?? HOLE);
    } catch (err) {
      return Promise.reject(this.damaged(volume, lba, err));
    }
    if (id === HOLE || id === ZERO_BLOCK) {
      into.fill(0);
      return RESOLVED;
    }
    const inFlight = this.view.pending.has(id);
    // Not while its write is in flight: the place may still hold a recycled file's old bytes.
    if (page && page.places[i] !== 0 && !inFlight && this.readPlaced(page, i, id, into)) return RESOLVED;
    const entry = inFlight ? undefined : this.view.lookupData(id);
    if (entry && entry.storedLength <= BLOCK) {
      const rec = this.recordScratch.subarray(0, RECORD_HEADER + entry.storedLength);
      try {
        if (this.view.segments.readCached(entry.segment, entry.offset, rec)) {
          decodeRecordInto(rec, id, entry.hash, this.view.hasher, into);
          if (page) notePlace(page, i, entry, rec);
          return RESOLVED;
        }
      } catch (err) {
        return Promise.reject(this.damaged(volume, lba, err));
      }
    }
    return this.readBlock(volume, lba).then((block) => {
      if (block) block.copy(into);
      else into.fill(0);
    });
  }

  /**
   * A block from the record place its page remembers, when the page cache holds it.
   * False sends the read the long way, which reports damage: a place is a hint, and
   * a record that fails here is read again from where the datamap says.
   */
  private readPlaced(page: MetaPage, i: number, id: number, into: Buffer): boolean {
    const place = page.places[i]!;
    const rec = this.recordScratch.subarray(0, RECORD_HEADER + page.lengths[i]!);
    try {
      if (!this.view.segments.readCached(placeSegment(place), placeOffset(place), rec)) return false;
      // The header's hash was the datamap's when the place was noted (notePlace).
      decodeRecordInto(rec, id, rec, this.view.hasher, into, RECORD_HASH_AT);
      return true;
    } catch {
      page.places[i] = 0;
      return false;
    }
  }

  /** A damaged record or metamap page becomes EIO for the block, with a log line naming it; other errors pass. */
  private damaged(volume: number, lba: number, err: unknown): unknown {
    if (!(err instanceof CorruptBlockError) && !(err instanceof MetaPageError)) return err;
    this.view.log.error(`volume ${this.view.volumeName(volume)} block ${lba}: ${err.message}`);
    return new BlockError('EIO', `block ${lba} is damaged: ${err.message}`);
  }

  /**
   * Reads `count` whole blocks from `lba` into `into` (count * 4 KiB): the metamap's
   * pages (or one range scan), and one pread for each run of records lying next to
   * each other in a segment (blocks written together sit together), each decoded
   * straight into place.
   */
  async readBlocks(volume: number, lba: number, count: number, into: Buffer): Promise<void> {
    let runs: RunItem[][];
    let singles: Promise<void>[];
    try {
      ({ runs, singles } = this.planRuns(volume, lba, count, into));
    } catch (err) {
      throw this.damaged(volume, lba, err); // a damaged metamap page
    }
    await settleAll([...singles, ...runs.map((r) => this.readRun(volume, lba, r, into))]);
  }

  /**
   * The records of a long read in runs of neighbours, holes and zero blocks filled in
   * `into` meanwhile; singles are blocks read the single-block way, started here.
   */
  private planRuns(
    volume: number,
    lba: number,
    count: number,
    into: Buffer,
  ): { runs: RunItem[][]; singles: Promise<void>[] } {
    const runs: RunItem[][] = [];
    const singles: Promise<void>[] = [];
    let run: RunItem[] = [];
    let runEnd = -1;
    let runSegment = -1;
    const ids =
      this.view.cacheEnabled() && !this.view.linked(volume) ? null : this.view.blockIds(volume, lba, count);
    // Every metamap page first: a damaged one throws before any read below has started.
    if (!ids) {
      for (let b = 0; b < count; b += META_PAGE - ((lba + b) % META_PAGE))
        this.view.metaPage(metaKey(volume, lba + b));
      if (this.view.anyMetaDamaged())
        for (let b = 0; b < count; b++)
          if (this.view.metaDamaged(metaKey(volume, lba + b))) throw metaPageDamaged(volume, lba + b);
    }
    for (let b = 0; b < count; b++) {
      const key = metaKey(volume, lba + b);
      const page = ids ? undefined : this.view.metaPage(key);
      const i = key % META_PAGE;
      const id = page ? page.ids[i]! : (ids![b] ?? HOLE);
      const at = b * BLOCK;
      if (id === HOLE || id === ZERO_BLOCK) {
        into.fill(0, at, at + BLOCK);
        continue;
      }
      let item: RunItem;
      const place = page ? page.places[i]! : 0;
      if (page && place !== 0 && !this.view.pending.has(id)) {
        const segment = placeSegment(place);
        const offset = placeOffset(place);
        item = { at, id, segment, offset, storedLength: page.lengths[i]!, hash: null, page, i };
      } else {
        const entry = this.view.pending.has(id) ? undefined : this.view.lookupData(id);
        if (!entry) {
          // Rare: in flight to its segment, or missing (reported by the single-block path).
          singles.push(this.readBlockInto(volume, lba + b, into.subarray(at, at + BLOCK)));
          continue;
        }
        const { segment, offset, storedLength, hash } = entry;
        item = { at, id, segment, offset, storedLength, hash, page, i };
      }
      // A record next to the last one joins the run, and so does the same record again
      // (a block repeated through the volume is read once).
      const last = run[run.length - 1];
      const follows = item.offset === runEnd || item.offset === last?.offset;
      if (item.segment === runSegment && follows && run.length < 256) run.push(item);
      else {
        if (run.length) runs.push(run);
        run = [item];
        runSegment = item.segment;
        runEnd = -1;
      }
      runEnd = Math.max(runEnd, item.offset + RECORD_HEADER + item.storedLength);
    }
    if (run.length) runs.push(run);
    return { runs, singles };
  }

  /**
   * One pread for a run of neighbouring records, each decoded into its place in `into`.
   * A long run is read and decoded in one pool job; a short one is read (inline when
   * cached) and decoded here.
   */
  private async readRun(volume: number, lba: number, run: RunItem[], into: Buffer): Promise<void> {
    const first = run[0]!;
    const last = run[run.length - 1]!;
    const length = last.offset + RECORD_HEADER + last.storedLength - first.offset;
    const pooled = length >= sharedBufferPool.minSize;
    const buf = pooled ? sharedBufferPool.acquire(length) : Buffer.allocUnsafe(length);
    const retries: Promise<void>[] = [];
    let failure: unknown;
    try {
      let status: Int32Array | null = null;
      try {
        if (run.length >= POOL_DECODE_MIN) status = await this.readDecoded(buf, run, into);
        else await this.view.segments.read(first.segment, first.offset, length, buf);
      } catch (err) {
        // A run of remembered places only: the segment may have gone since; read the long way.
        if (run.every((item) => item.hash === null)) return await this.rereadRun(volume, lba, run, into);
        throw err;
      }
      for (let k = 0; k < run.length; k++) {
        const item = run[k]!;
        const { at, id, page, i } = item;
        const recAt = item.offset - first.offset;
        try {
          if (status) {
            if (status[k] !== 0) throw decodeError(status[k]!, id, buf, recAt);
            if (item.hash !== null && page) notePlace(page, i, item, buf, recAt);
          } else if (item.hash === null)
            decodeRecordAt(buf, recAt, id, buf, recAt + RECORD_HASH_AT, this.view.hasher, into, at);
          else {
            decodeRecordAt(buf, recAt, id, item.hash, 0, this.view.hasher, into, at);
            if (page) notePlace(page, i, item, buf, recAt);
          }
        } catch (err) {
          if (item.hash !== null) {
            // The read fails, once the rest of the run (retries included) is done with `into`.
            failure ??= this.damaged(volume, lba + at / BLOCK, err);
            continue;
          }
          // A remembered place that no longer holds the block: forget it, read the long way.
          page!.places[i] = 0;
          retries.push(this.readBlockInto(volume, lba + at / BLOCK, into.subarray(at, at + BLOCK)));
        }
      }
    } finally {
      if (pooled) sharedBufferPool.release(buf);
    }
    await settleAll(retries);
    if (failure !== undefined) throw failure;
  }

  /**
   * Reads a run's records into `buf` and decodes them into `into`, both in one libuv
   * pool job: the event loop neither copies the run nor waits for the pool twice.
   * A status per record (0: good).
   */
  private async readDecoded(buf: Buffer, run: RunItem[], into: Buffer): Promise<Int32Array> {
    const base = run[0]!.offset;
    const items = new Float64Array(run.length * 4);
    const hashes = Buffer.allocUnsafe(run.length * 16);
    for (let k = 0; k < run.length; k++) {
      const item = run[k]!;
      items[4 * k] = item.offset - base;
      items[4 * k + 1] = item.id;
      items[4 * k + 2] = item.at;
      if (item.hash === null) items[4 * k + 3] = -1;
      else {
        item.hash.copy(hashes, 16 * k);
        items[4 * k + 3] = 16 * k;
      }
    }
    const status = new Int32Array(run.length);
    await this.view.segments.readWith(run[0]!.segment, base, (fd) =>
      this.view.hasher.decodeMany(buf, items, hashes, into, status, { fd, offset: base }),
    );
    return status;
  }

  private async rereadRun(
    volume: number,
    lba: number,
    run: Array<{ at: number; page: MetaPage | undefined; i: number }>,
    into: Buffer,
  ): Promise<void> {
    await settleAll(
      run.map(({ at, page, i }) => {
        if (page) page.places[i] = 0;
        return this.readBlockInto(volume, lba + at / BLOCK, into.subarray(at, at + BLOCK));
      }),
    );
  }

  /**
   * The blocks of [lba, lba + count) whose stored copy fails its checks, with their
   * block ids: a window read the long way (one pread per run, decoded on the pool), and
   * only a window that fails is read again a block at a time to find which. Errors
   * other than damage (a failed pread) are thrown. `scratch` holds `count` blocks.
   */
  async damagedBlocks(
    volume: number,
    lba: number,
    count: number,
    scratch: Buffer,
  ): Promise<Array<{ lba: number; id: number }>> {
    try {
      await this.readBlocks(volume, lba, count, scratch);
      return [];
    } catch (err) {
      if (!(err instanceof BlockError) || err.code !== 'EIO') throw err;
    }
    const damaged: Array<{ lba: number; id: number }> = [];
    for (let b = lba; b < lba + count; b++) {
      const id = this.view.resolveMeta(volume, b);
      if (id === undefined || id === ZERO_BLOCK) continue;
      try {
        await this.readStored(id);
      } catch (err) {
        if (!(err instanceof CorruptBlockError)) throw err;
        this.damaged(volume, b, err);
        damaged.push({ lba: b, id });
      }
    }
    return damaged;
  }

  private async readStored(id: number): Promise<Buffer> {
    const entry = this.view.lookupData(id);
    if (!entry) throw new CorruptBlockError(`block ${id} has no datamap entry`);
    const rec =
      this.view.pending.get(id)?.record ??
      (await this.view.segments.read(entry.segment, entry.offset, RECORD_HEADER + entry.storedLength));
    return decodeRecord(rec, id, entry.hash, this.view.hasher);
  }
}
