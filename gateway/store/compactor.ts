// Gives space back. A segment whose live records fall below a fraction of
// its size is walked record by record; the records the datamap still points
// at are copied to the current segment (relocate), and once a checkpoint has
// made the copies and the new locations durable the old file is deleted.
// It runs in the background, throttled, a bounded chunk at a time, so
// foreground I/O waits for it at most one chunk's parse. While clients are
// reading or writing it slows to a fraction of its rate, as a ZFS scrub
// yields to other I/O: on a small machine its copying and checkpoints took
// a third of the CPU that reads right after a big rewrite wanted.

import fs from 'node:fs';
import { decodeRecordHeader, RECORD_HEADER, RECORD_MAGIC } from './layout';
import type { DedupStore } from './dedup-store';
import type { Logger } from '../util/log';

export interface CompactionResult {
  segments: number;
  movedBytes: number;
  freedBytes: number;
}

export interface CompactorOptions {
  /** A sealed segment is compacted when live bytes fall below this fraction of its size. */
  threshold: number;
  /** Bytes read per second while walking segments. */
  bytesPerSecond: number;
  /** The rate while clients are busy, as a fraction of bytesPerSecond. */
  busyFraction: number;
  /** How often to look for work in the background (0: never). */
  intervalMs: number;
}

const DEFAULTS: CompactorOptions = {
  threshold: 0.5,
  bytesPerSecond: 128 * 1024 * 1024,
  busyFraction: 1 / 8,
  intervalMs: 10_000,
};
const CHUNK = 1024 * 1024;
/**
 * Relocations started together, at most: an io-batcher job's count of records. Each is an
 * entry every read scans in PendingRecords while it is in flight, and a 1 MiB window of
 * well-compressed records holds thousands.
 */
const MOVES_AT_ONCE = 256;
/** Segments with less garbage than this are not worth a rewrite. */
const MIN_GARBAGE = 1024 * 1024;
/**
 * A background pass walks only a segment an earlier pass saw, and that lost at most this
 * fraction of its size in live bytes since: one still losing them is being overwritten,
 * and mostly empties by itself (then it goes without a walk). In a sync mirror pair's 1M
 * sequential overwrite after random 4k writes, passes moved 12-130 MB of records the
 * overwrite was about to kill, on both gateways, while the clients' writes ran. Rounds of
 * that sequence on fresh pairs: 97-261 MB/s (mean 180, twelve rounds) before, 223-254
 * (mean 237, six) with this rule.
 */
const STILL_DYING = 0.05;
const MAGIC = Buffer.alloc(4);
MAGIC.writeUInt32BE(RECORD_MAGIC);

export class Compactor {
  private running: Promise<CompactionResult> | null = null;
  /** Set by close(): a pass under way stops at its next window (a throttled walk of a big segment took seconds). */
  private stopping = false;
  private startedAtLastPass = -1;
  /** Live bytes of each sealed segment as the last pass saw them. */
  private liveAtLastPass = new Map<number, number>();
  private readonly timer: NodeJS.Timeout | null;
  private readonly opts: CompactorOptions;

  constructor(
    private readonly store: DedupStore,
    private readonly log: Logger,
    opts: Partial<CompactorOptions> = {},
  ) {
    this.opts = { ...DEFAULTS, ...opts };
    this.timer =
      this.opts.intervalMs > 0
        ? setInterval(() => {
            if (!this.running)
              this.run(false).catch((e) => this.log.error(`compaction: ${(e as Error).message}`));
          }, this.opts.intervalMs)
        : null;
    this.timer?.unref();
  }

  /**
   * One pass over the sealed segments. With `everything`, any segment holding
   * garbage is rewritten (and the current one sealed first), as an operator or a
   * test asks for after deleting a volume.
   */
  run(everything: boolean): Promise<CompactionResult> {
    this.running ??= this.pass(everything).finally(() => (this.running = null));
    return this.running;
  }

  private async pass(everything: boolean): Promise<CompactionResult> {
    const result: CompactionResult = { segments: 0, movedBytes: 0, freedBytes: 0 };
    const segs = this.store.segments;
    if (everything) segs.roll();
    // Sealed before the flush below: every record these hold is in the index after it.
    const bound = segs.currentSegment;
    // Everything a victim holds must be in the index before its records are judged live
    // or dead: victims are sealed before this flush, so no later write lands in one.
    await this.store.collect();
    const lastSeen = this.liveAtLastPass;
    this.liveAtLastPass = new Map();
    for (const n of segs.sealed()) {
      if (this.stopping) break;
      const size = segs.size(n);
      const liveBytes = this.store.segmentLiveBytes(n);
      this.liveAtLastPass.set(n, liveBytes);
      const garbage = size - liveBytes;
      if (garbage <= 0) continue;
      if (liveBytes === 0 && n < bound) {
        // Nothing to move: no walk needed. (One sealed during the flush may hold records
        // only the overlays know of yet: the walk below asks the datamap, overlays and all.)
        const deleted = await segs.remove(n);
        result.segments++;
        // A segment kept as a spare gives its space back when the spares go (below).
        if (deleted) result.freedBytes += size;
        continue;
      }
      if (!everything && (garbage < MIN_GARBAGE || liveBytes >= size * this.opts.threshold)) continue;
      // Seen by no earlier pass (sealed since), its decline is unknown: the next pass judges it.
      const before = lastSeen.get(n);
      if (!everything && (before === undefined || before - liveBytes > size * STILL_DYING)) continue;
      const done = await this.compactSegment(n, size);
      if (done === null) continue;
      result.segments++;
      result.movedBytes += done.moved;
      if (done.deleted) result.freedBytes += size - done.moved;
    }
    // Spares hold disk space: given back when asked to, or once writes have stopped
    // starting segments (a pass went by without one).
    if (everything || segs.startedCount === this.startedAtLastPass)
      result.freedBytes += await segs.dropSpares();
    this.startedAtLastPass = segs.startedCount;
    if (result.segments) {
      this.log.info(
        `compaction: ${result.segments} segment(s), moved ${result.movedBytes} bytes, freed ${result.freedBytes} bytes`,
      );
    }
    return result;
  }

  /**
   * Moves the live records out of segment `n`, then deletes it. Returns bytes moved and
   * whether the file went (not kept, nor made a spare), or null when the segment was
   * gone already (its last records died at a commit meanwhile).
   */
  private async compactSegment(n: number, size: number): Promise<{ moved: number; deleted: boolean } | null> {
    const segs = this.store.segments;
    // Pinned, it is deleted rather than written over should its last record die meanwhile.
    segs.pin(n);
    let fd: number;
    try {
      fd = fs.openSync(segs.path(n), 'r');
    } catch (err) {
      segs.unpin(n);
      // Removed since the pass listed it: its records died at a commit meanwhile.
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw err;
    }
    let moved = 0;
    let moves: Array<Promise<number>> = [];
    try {
      let pos = 0;
      let buf = Buffer.alloc(0);
      let bufStart = 0;
      // Past bytes that are no record: a write that failed (records appended beside it
      // in the same tick may follow) or a torn tail. Until a record the datamap points at
      // turns up, a header found there is a candidate only, and its length is not trusted.
      let lost = false;
      const pace = { at: Date.now(), ops: this.store.foregroundOps };
      // A window's live records are relocated together (up to MOVES_AT_ONCE): started in one
      // tick, their appends reach the pool in io-batcher jobs of up to 256 KiB. Awaited one
      // by one, each record cost a thread-pool round trip and a pwrite, and compaction
      // running beside 4k random reads took a fifth of their IOPS.
      const settleMoves = async (): Promise<void> => {
        const batch = moves;
        moves = [];
        const outcomes = await Promise.allSettled(batch);
        for (const o of outcomes) if (o.status === 'fulfilled') moved += o.value;
        for (const o of outcomes) if (o.status === 'rejected') throw o.reason;
      };
      while (pos < size) {
        // Keep at least one whole record in the window.
        if (pos + RECORD_HEADER > bufStart + buf.length || !this.wholeRecordAt(buf, pos - bufStart)) {
          await settleMoves();
          // Records moved so far stay moved (the store's closing checkpoint keeps them); the
          // rest wait for a later run.
          if (this.stopping) break;
          const want = Math.min(CHUNK, size - pos);
          buf = Buffer.alloc(want);
          const got = await new Promise<number>((resolve, reject) =>
            fs.read(fd, buf, 0, want, pos, (err, r) => (err ? reject(err) : resolve(r))),
          );
          buf = buf.subarray(0, got);
          bufStart = pos;
          if (got === 0) break;
          await this.throttle(pace, got);
          if (!this.wholeRecordAt(buf, 0)) {
            lost = true;
            pos = nextCandidate(buf, bufStart, 1);
            continue;
          }
        }
        const at = pos - bufStart;
        const h = decodeRecordHeader(buf, at)!;
        const length = RECORD_HEADER + h.storedLength;
        const e = this.store.lookupData(h.blockId);
        const placed = e !== undefined && e.segment === n && e.offset === pos;
        if (!placed && lost) {
          pos = nextCandidate(buf, bufStart, at + 1);
          continue;
        }
        lost = false;
        if (e && placed) {
          if (e.storedLength !== h.storedLength || !e.hash.equals(h.hash)) {
            // Not the record the datamap describes: left where it is (the segment then stays)
            // for reads to report, rather than copied as the block and its place deleted.
            this.log.error(
              `compaction: segment ${n} @${pos}: record header disagrees with block ${h.blockId}'s entry`,
            );
          } else {
            const record = Buffer.from(buf.subarray(at, at + length));
            moves.push(this.store.relocate(h.blockId, record).then((done) => (done ? length : 0)));
            if (moves.length >= MOVES_AT_ONCE) await settleMoves();
          }
        }
        pos += length;
      }
      await settleMoves();
    } finally {
      // Left by a throw mid-window: observed, so none can end the process unhandled.
      await Promise.allSettled(moves);
      fs.closeSync(fd);
      segs.unpin(n);
    }
    if (this.stopping) return { moved, deleted: false };
    // The moves and the copies' bytes are durable before the only other copy goes.
    await this.store.collect();
    const left = this.store.segmentLiveBytes(n);
    if (left > 0) {
      this.log.warn(`compaction: segment ${n} still holds ${left} live bytes; keeping it`);
      return { moved, deleted: false };
    }
    return { moved, deleted: await segs.remove(n) };
  }

  private wholeRecordAt(buf: Buffer, at: number): boolean {
    const h = decodeRecordHeader(buf, at);
    return h !== null && at + RECORD_HEADER + h.storedLength <= buf.length;
  }

  /**
   * Sleeps as needed to stay under the read rate: the full one while clients are
   * idle, busyFraction of it while the store served requests since the last chunk.
   */
  private async throttle(pace: { at: number; ops: number }, bytes: number): Promise<void> {
    const ops = this.store.foregroundOps;
    const busy = ops !== pace.ops;
    pace.ops = ops;
    const rate = this.opts.bytesPerSecond * (busy ? this.opts.busyFraction : 1);
    const wait = (bytes / rate) * 1000 - (Date.now() - pace.at);
    await new Promise((r) => (wait > 0 ? setTimeout(r, wait) : setImmediate(r)));
    pace.at = Date.now();
  }

  close(): Promise<unknown> {
    this.stopping = true;
    if (this.timer) clearInterval(this.timer);
    return this.running ?? Promise.resolve();
  }
}

/**
 * The segment position where a record header may start next in the window `buf`
 * (read at `bufStart`), looking from `from` on; failing that, near the window's end,
 * where a header cut by it would begin.
 */
function nextCandidate(buf: Buffer, bufStart: number, from: number): number {
  const k = buf.indexOf(MAGIC, from);
  return bufStart + (k >= 0 ? k : Math.max(from, buf.length - MAGIC.length + 1));
}
