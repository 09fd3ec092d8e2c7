// The primary's side of one replica of one volume: a link to the replica
// gateway, the batches in flight on it, and what the replica still lacks.
//
// Every local write's resulting state (captured in one tick by the store) is
// queued in write order and coalesced with the others of its tick into one
// Batch. The replica asks for the bytes it lacks (Need), gets them (Blocks),
// applies the batch at once and acknowledges it. In DRBD's terms a sync
// replica is protocol C (the write is acknowledged to the client once every
// sync replica has applied it; FLUSH and FUA once it is durable there) and an
// async one protocol A (acknowledged after the local apply).
//
// What the replica still lacks is kept as dirty chunks of 1024 blocks: all of
// them when the mirror starts (the initial sync, hash-first, so blocks the
// replica already holds under any volume never travel), then whatever was in
// flight when the link broke or stalled, and everything written while it was
// down or behind. The sync walks them in order, re-capturing each chunk's
// current state. The set lives in memory: after a restart of the primary the
// walk starts over, still hash-first, so only the ids of unchanged blocks
// travel again.

import { BlockError } from '../device/errors';
import type { Logger } from '../util/log';
import { RecentIds } from '../util/recent-ids';
import { Frame, WireBlock } from '../../protocol/replication/frames';
import { LinkProtocolError } from '../../protocol/replication/errors';
import type { BlockSource, CapturedRange, DedupStore } from '../store/dedup-store';
import { META_PAGE } from '../store/meta-cache';
import { recordPayload } from '../store/block-codec';
import { ActivityLog } from './activity-log';
import { maySettle } from './settle';
import { connectLink, Link, LinkIdentity } from './link';

export type MirrorMode = 'sync' | 'async';
export type MirrorState = 'connecting' | 'syncing' | 'in-sync' | 'behind' | 'superseded';

/** Chunks are the store's metamap pages: verify's digests are cached per page. */
export const CHUNK_BLOCKS = META_PAGE;
/** Batches sent and not yet acknowledged, at most. */
const WINDOW = 8;
/**
 * Chunks per verify request (128 KiB of digests, 16 GiB of volume): every chunk's digest in
 * one frame would pass the link's frame limit at 8 TiB, and computing them holds the event
 * loop of both gateways for as long as it takes.
 */
export const VERIFY_SLICE_CHUNKS = 4096;
/**
 * Blocks a primary asks of a replica per FetchBlocks: the Blocks answer, up to 4 KiB and a
 * table entry a block, stays under the 1 MiB a replica's frames are held to (LARGEST_FRAME).
 */
export const FETCH_BLOCKS_MAX = 128;
/** A tick's writes share a batch up to this many blocks. */
const BATCH_BLOCKS = 1024;
const RETRY_MS = 1000;
/**
 * A replica acknowledges a batch once applied, durable or not; a crash of the
 * replica loses what it applied since its last checkpoint. So the primary asks
 * for a durable point this often while there are applied-but-volatile batches,
 * and keeps their ranges until one comes: a replica that crashed is sent them again.
 */
const DURABLE_EVERY_MS = 1000;
/** How often the activity log drops the chunks the replica holds durably. */
const SETTLE_LOG_MS = 2000;
/** Ids of blocks sent with their batch that are remembered, so none goes that way twice. */
const INLINED_IDS = 8192;
/** A chunk stays marked until no change has touched it for this long. */
const AL_COOL_MS = 10_000;

export interface MirrorOptions {
  /** A sync replica that has not acknowledged for this long drops to behind (writes go on). */
  timeoutMs: number;
  /**
   * Client data (bytes of blocks) sent to the replica and not acknowledged yet, at most:
   * past it an async replica's writers wait for their batch as sync ones do (DRBD's
   * on-congestion block), so a replica slower than the volume bounds this gateway's
   * memory instead of growing it; a stalled one still drops to behind after timeoutMs.
   */
  bufferBytes: number;
  /** The volume's generation here: the replica refuses it if its own copy has a newer one. */
  generation: number;
  /** The replica's copy has a newer generation (it was promoted): this volume is stale here. */
  onSuperseded: (peer: string, generation: number) => void;
  /** Bytes per second of block data the initial sync and resyncs may send; 0: no limit. */
  maxRate: number;
  /** The disaster-recovery site: fed before the volume's other replicas. */
  dr: boolean;
  /** The activity log's file (activity-log.ts): where a restarted primary resumes the sync. */
  activityLog: string;
  /**
   * replica add --seeded: the bundle the replica's copy was imported from, and the
   * snapshot (store volume) marking its export point. A replica that confirms its copy
   * is still that bundle is sent only the chunks changed since the snapshot.
   */
  seed?: { bundleId: Buffer; snapshot: number };
  /**
   * The mirror was resumed by a (re)started primary: writes wait for the replica's first
   * answer (see `answer`), as DRBD waits for its peer at startup (wfc-timeout).
   */
  holdWritesUntilAnswer?: boolean;
}

interface Batch {
  seq: number;
  ranges: CapturedRange[];
  blocks: number;
  durable: boolean;
  sentAt: number;
  /** Sync-mode writers waiting for the acknowledgement; an error fails their write. */
  waiters: Array<(err?: Error) => void>;
  /** Sent by the initial sync or a resync (throttled by --max-rate), not by a client's write. */
  resync?: boolean;
}

const VERIFY_TIMEOUT_MS = 60_000;
/**
 * Blocks a replica scrubs per request (verify --scrub): answered at its place among the
 * batches, so a slice holds the batches after it back while it is read (4 MiB, a few
 * ms from the page cache); a whole volume at once would hold a sync writer for seconds.
 */
export const SCRUB_SLICE_BLOCKS = 1024;

function waitFor(batch: Batch): Promise<void> {
  return new Promise((resolve, reject) => batch.waiters.push((err) => (err ? reject(err) : resolve())));
}

/** What `verify` found for one replica: block ranges whose content differs, by content id. */
export interface VerifyReport {
  to: string;
  state: MirrorState;
  chunks: number;
  differingChunks: number;
  mismatched: Array<{ offset: number; length: number }>;
  /**
   * verify --scrub: ranges whose bytes the replica holds damaged (they fail their content
   * ids when read back). They are marked for the resync, which sends them again.
   */
  damaged?: Array<{ offset: number; length: number }>;
}

/** Byte ranges of a sorted list of blocks, neighbours joined. */
export function byteRanges(lbas: number[]): Array<{ offset: number; length: number }> {
  const ranges: Array<{ offset: number; length: number }> = [];
  for (const lba of lbas) {
    const last = ranges[ranges.length - 1];
    if (last && last.offset + last.length === lba * 4096) last.length += 4096;
    else ranges.push({ offset: lba * 4096, length: 4096 });
  }
  return ranges;
}

export interface MirrorStatus {
  to: string;
  mode: MirrorMode;
  /** The disaster-recovery replica (fed first; its lag is this status's own). */
  dr: boolean;
  /** --max-rate in bytes per second (0: none). */
  maxRate: number;
  state: MirrorState;
  peer: string | null;
  /** Logical bytes the replica does not hold safely yet: dirty chunks, unacknowledged and not yet durable batches. */
  lagBytes: number;
  /** Age of the oldest unacknowledged batch, in seconds (0 when there is none). */
  lagSeconds: number;
  /** Async writers waiting now because the replica trails by more than --mirror-buffer. */
  heldWriters: number;
  lastAckAt: string | null;
  /** Chunks of the volume the current sync still has to send, and how many it had. */
  sync: { remainingChunks: number; totalChunks: number };
  sentBytes: number;
  sentBlocks: number;
  sentBatches: number;
  lastError: string | null;
}

export class Mirror {
  state: MirrorState = 'connecting';
  private link: Link | null = null;
  private seq = 0;
  private filling: Batch | null = null;
  private readonly inflight: Batch[] = [];
  private readonly dirty: DirtyChunks;
  /** Ranges of batches the replica applied but may not have on disk yet. */
  private volatile: Array<{ lba: number; count: number }> = [];
  private volatileSince = 0;
  /** Tells the store this mirror no longer needs its recent records. */
  private readonly detach: () => void;
  private syncTotal = 0;
  private closed = false;
  private retry: NodeJS.Timeout | null = null;
  private readonly watchdog: NodeJS.Timeout;
  private lastAckAt: number | null = null;
  private lastError: string | null = null;
  private sentBytes = 0;
  private sentBlocks = 0;
  private sentBatches = 0;
  private peer: string | null = null;
  private verifySeq = 0;
  /** Blocks lately sent with their batches (oldest first), not to be sent that way again. */
  private readonly inlined = new RecentIds(INLINED_IDS);
  /**
   * Pending until the replica has answered this gateway's first Mirror frame (ready,
   * refused or superseded), or timeoutMs has passed: a primary restarted after its
   * replica was promoted must learn that before it takes writes that would diverge.
   * Null once settled, and for mirrors that do not hold writes.
   */
  answer: Promise<void> | null = null;
  private answered: () => void = () => undefined;
  /** Set while a cutover waits for the replica's promote. */
  private cutoverDone: ((generation: number) => void) | null = null;
  private readonly al: ActivityLog;
  /** Changes under way per chunk (activated, not yet captured): never unmarked meanwhile. */
  private readonly active: Uint32Array;
  /**
   * When a change last touched each chunk (performance.now(), which no clock step moves):
   * the activity log keeps hot chunks marked, and those changed since the last checkpoint.
   */
  private readonly touched: Float64Array;
  /** Sync batches sent and not yet acknowledged (the window counts these only). */
  private resyncInflight = 0;
  /** Blocks of clients' changes in batches sent or filling, not acknowledged yet (see bufferBytes). */
  private unackedBlocks = 0;
  /** Async writers held back by bufferBytes, each released once (acknowledgement or suspendBackpressure). */
  private readonly held = new Set<() => void>();
  private backpressureOff = 0;
  private pumpTimer: NodeJS.Timeout | null = null;
  private settledAt = 0;
  private tokens = 0;
  private tokensAt = Date.now();
  private readonly verifying = new Map<
    number,
    { resolve: (mismatched: number[]) => void; reject: (e: Error) => void }
  >();
  /** fetchBlocks waiting for their Blocks answers, by sequence number. */
  private readonly fetching = new Map<
    number,
    { resolve: (blocks: WireBlock[]) => void; reject: (e: Error) => void }
  >();

  constructor(
    private readonly store: DedupStore,
    private readonly volumeId: number,
    readonly volumeName: string,
    private readonly volumeBlocks: number,
    readonly to: { host: string; port: number },
    readonly mode: MirrorMode,
    private readonly me: LinkIdentity,
    private readonly log: Logger,
    private readonly opts: MirrorOptions,
  ) {
    this.dirty = new DirtyChunks(Math.ceil(volumeBlocks / CHUNK_BLOCKS));
    const { log: al, resumed } = ActivityLog.open(opts.activityLog, this.dirty.chunks);
    this.detach = store.attachMirror();
    this.al = al;
    this.active = new Uint32Array(this.dirty.chunks);
    this.touched = new Float64Array(this.dirty.chunks);
    if (resumed) {
      // What the replica may lack when this primary last stopped (or crashed): only that.
      for (let c = 0; c < this.dirty.chunks; c++) if (al.marked(c)) this.dirty.add(c);
      this.syncTotal = this.dirty.size;
    } else this.markAllDirty();
    this.watchdog = setInterval(
      () => this.checkStall(),
      Math.min(DURABLE_EVERY_MS / 2, Math.max(100, opts.timeoutMs / 4)),
    );
    this.watchdog.unref();
    if (opts.holdWritesUntilAnswer) this.holdWrites();
    this.connect();
  }

  private holdWrites(): void {
    const timer = setTimeout(() => {
      this.log.warn(
        `replica ${this.address} of ${this.volumeName} did not answer within ${this.opts.timeoutMs} ms: ` +
          'taking writes without knowing whether a newer copy exists there',
      );
      this.answered();
    }, this.opts.timeoutMs);
    timer.unref();
    this.answer = new Promise<void>((resolve) => {
      this.answered = () => {
        clearTimeout(timer);
        this.answer = null;
        this.answered = () => undefined;
        resolve();
      };
    });
  }

  get address(): string {
    return `${this.to.host}:${this.to.port}`;
  }

  status(): MirrorStatus {
    const oldest = this.inflight[0];
    const unacked =
      this.inflight.reduce((n, b) => n + b.blocks, 0) +
      (this.filling?.blocks ?? 0) +
      this.volatile.reduce((n, r) => n + r.count, 0);
    return {
      to: this.address,
      mode: this.mode,
      dr: this.opts.dr,
      maxRate: this.opts.maxRate,
      state: this.state,
      peer: this.peer,
      lagBytes: (this.dirty.size * CHUNK_BLOCKS + unacked) * 4096,
      lagSeconds: oldest ? Math.max(0, Date.now() - oldest.sentAt) / 1000 : 0,
      heldWriters: this.held.size,
      lastAckAt: this.lastAckAt === null ? null : new Date(this.lastAckAt).toISOString(),
      sync: { remainingChunks: this.dirty.size, totalChunks: this.syncTotal },
      sentBytes: this.sentBytes + (this.link?.bytesOut ?? 0),
      sentBlocks: this.sentBlocks,
      sentBatches: this.sentBatches,
      lastError: this.lastError,
    };
  }

  /**
   * A local change to blocks lba.. (captured by the store in the tick it happened).
   * Resolves when the client may be answered: at once for async, at the replica's
   * acknowledgement for sync, or at once when the replica is not keeping up (behind).
   */
  captured(range: CapturedRange, durable: boolean): Promise<void> {
    if (this.state !== 'in-sync' && this.state !== 'syncing') {
      this.markDirty(range.lba, range.kinds.length);
      return Promise.resolve();
    }
    const batch = this.batchFor(range.kinds.length);
    batch.ranges.push(range);
    batch.blocks += range.kinds.length;
    batch.durable ||= durable;
    this.unackedBlocks += range.kinds.length;
    if (this.mode === 'sync') return waitFor(batch);
    if (this.backpressureOff > 0 || this.unackedBlocks * 4096 <= this.opts.bufferBytes)
      return Promise.resolve();
    return new Promise((resolve) => {
      const release = (): void => {
        if (this.held.delete(release)) resolve();
      };
      this.held.add(release);
      batch.waiters.push(release);
    });
  }

  /**
   * Lets the async writers held back by bufferBytes go, and holds none until the returned
   * function is called. A snapshot's or a cutover's barrier waits for the writes in
   * flight; those are applied here already, and a congested replica must not keep the
   * barrier from closing.
   */
  suspendBackpressure(): () => void {
    this.backpressureOff++;
    for (const release of [...this.held]) release();
    let resumed = false;
    return () => {
      if (resumed) return;
      resumed = true;
      this.backpressureOff--;
    };
  }

  /**
   * Before a change to blocks lba.. is applied locally: marks their chunks in the
   * activity log (durably: the returned promise, when there is one, must settle first).
   * `release` once the change is captured (or has failed and marked itself dirty).
   */
  activate(lba: number, count: number): { ready: Promise<void> | null; release: () => void } {
    const first = Math.floor(lba / CHUNK_BLOCKS);
    const last = Math.min(Math.floor((lba + Math.max(count, 1) - 1) / CHUNK_BLOCKS), this.dirty.chunks - 1);
    const now = performance.now();
    for (let c = first; c <= last; c++) {
      this.active[c]!++;
      this.touched[c] = now;
    }
    let released = false;
    return {
      ready: this.closed ? null : this.al.mark(first, last),
      release: () => {
        if (released) return;
        released = true;
        // Touched again as the change ends: its last mapping was set before this moment.
        const ended = performance.now();
        for (let c = first; c <= last; c++) {
          this.active[c]!--;
          this.touched[c] = ended;
        }
      },
    };
  }

  /** Unmarks the chunks the replica now holds durably: none dirty, active, in flight or volatile. */
  private settleLog(): void {
    const busy = new Uint8Array(this.dirty.chunks);
    const cover = (lba: number, count: number): void => {
      if (count === 0) return;
      const last = Math.min(Math.floor((lba + count - 1) / CHUNK_BLOCKS), busy.length - 1);
      for (let c = Math.floor(lba / CHUNK_BLOCKS); c <= last; c++) busy[c] = 1;
    };
    for (const b of this.inflight) for (const r of b.ranges) cover(r.lba, r.kinds.length);
    for (const r of this.filling?.ranges ?? []) cover(r.lba, r.kinds.length);
    for (const r of this.volatile) cover(r.lba, r.count);
    // Only chunks left alone for a while (DRBD keeps its hot extents for this), and none
    // whose last change is in this store's memory only (settle.ts).
    const cool = performance.now() - AL_COOL_MS;
    const durable = this.store.durableAsOf;
    const activity = { busy, active: this.active, touched: this.touched, dirty: this.dirty };
    for (let c = 0; c < busy.length; c++)
      if (maySettle(c, activity, cool, durable) && this.al.marked(c)) this.al.unmark(c);
    this.al.saveLazily();
  }

  /** FLUSH: on a sync replica, resolves once everything before it is durable there. */
  flush(): Promise<void> {
    if (this.mode === 'async' || (this.state !== 'in-sync' && this.state !== 'syncing'))
      return Promise.resolve();
    const batch = this.batchFor(0);
    batch.durable = true;
    return waitFor(batch);
  }

  /**
   * The primary took snapshot `name` at this point of the write order (writes held):
   * the replica takes one at the same point, when it is in sync (its copy then goes
   * through exactly the primary's states). False when it is not, and no snapshot goes.
   */
  snapshot(name: string): boolean {
    const link = this.link;
    if (!link || this.state !== 'in-sync' || this.dirty.size > 0) return false;
    this.sendFilling();
    link.send({ snapshot: { name } });
    return true;
  }

  /**
   * replica add --cutover, with the volume's writes held: once everything is applied and
   * durable on the replica, it promotes its copy; resolves with its new generation.
   */
  async cutover(timeoutMs: number): Promise<number> {
    const link = this.link;
    if (!link || this.state !== 'in-sync' || this.dirty.size > 0)
      throw new Error(`replica ${this.address} is ${this.state}, not in sync`);
    const durable = this.batchFor(0);
    durable.durable = true;
    await waitFor(durable);
    if (this.link !== link) throw new Error(`replica ${this.address}: the link broke during the cutover`);
    return new Promise<number>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.cutoverDone = null;
        reject(new Error(`replica ${this.address} did not promote within ${timeoutMs} ms`));
      }, timeoutMs);
      this.cutoverDone = (generation) => {
        clearTimeout(timer);
        this.cutoverDone = null;
        resolve(generation);
      };
      link.send({ cutover: { volume: this.volumeName } });
    });
  }

  /**
   * Compares this volume with the replica's copy by content ids: chunk digests first,
   * then the blocks of the chunks that differ. Both sides answer at the same point of
   * the write order, so writes going on meanwhile are no false alarm.
   */
  async verify(opts: { scrub?: boolean } = {}): Promise<VerifyReport> {
    const mismatched: number[] = [];
    const total = Math.ceil(this.volumeBlocks / CHUNK_BLOCKS);
    const chunks: number[] = [];
    for (let first = 0; first < total; first += VERIFY_SLICE_CHUNKS) {
      const digests = (): Frame => ({
        verifyChunks: {
          seq: ++this.verifySeq,
          first,
          digests: this.store.chunkDigests(this.volumeId, this.volumeBlocks, first, VERIFY_SLICE_CHUNKS),
        },
      });
      chunks.push(...(await this.request(digests)));
    }
    for (const c of chunks) {
      const lba = c * CHUNK_BLOCKS;
      const count = Math.min(CHUNK_BLOCKS, this.volumeBlocks - lba);
      const blocks = (): Frame => {
        const r = this.store.captureRange(this.volumeId, lba, count);
        return { verifyBlocks: { seq: ++this.verifySeq, lba, kinds: r.kinds, cids: r.cids } };
      };
      mismatched.push(...(await this.request(blocks)));
    }
    const report: VerifyReport = {
      to: this.address,
      state: this.state,
      chunks: total,
      differingChunks: chunks.length,
      mismatched: byteRanges(mismatched),
    };
    if (opts.scrub) report.damaged = byteRanges(await this.scrubReplica());
    return report;
  }

  /**
   * The replica's stored copies of blocks `lbas` (at most FETCH_BLOCKS_MAX), for mending
   * this copy's damaged ones: a block's ordinal is its index in `lbas`, and those the
   * replica could not give are missing. Unchecked: the caller checks each against the
   * content id it expects, so a replica still syncing (whose copy may be older) serves too.
   */
  fetchBlocks(lbas: number[]): Promise<WireBlock[]> {
    const link = this.link;
    if (!link || (this.state !== 'in-sync' && this.state !== 'syncing'))
      return Promise.reject(
        new Error(`replica ${this.address} is ${this.state}: no blocks to fetch from it`),
      );
    const seq = ++this.verifySeq;
    const answer = this.awaitAnswer(this.fetching, seq, 'a fetch');
    link.send({ fetchBlocks: { seq, lbas } });
    return answer;
  }

  /** The answer to request `seq`, registered in `waiting` (the link's loss rejects it), or a timeout. */
  private awaitAnswer<T>(
    waiting: Map<number, { resolve: (r: T) => void; reject: (e: Error) => void }>,
    seq: number,
    what: string,
  ): Promise<T> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        waiting.delete(seq);
        reject(new Error(`replica ${this.address} did not answer ${what} within ${VERIFY_TIMEOUT_MS} ms`));
      }, VERIFY_TIMEOUT_MS);
      waiting.set(seq, {
        resolve: (r) => {
          clearTimeout(timer);
          resolve(r);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
    });
  }

  /**
   * verify --scrub: the replica reads its copy back a slice at a time and names the
   * blocks whose bytes are damaged; each is marked dirty here, so the resync sends it
   * again, and the replica, which took it out of its hash index, asks for its bytes.
   */
  private async scrubReplica(): Promise<number[]> {
    const damaged: number[] = [];
    for (let lba = 0; lba < this.volumeBlocks; lba += SCRUB_SLICE_BLOCKS) {
      const count = Math.min(SCRUB_SLICE_BLOCKS, this.volumeBlocks - lba);
      const found = await this.request(() => ({ scrubBlocks: { seq: ++this.verifySeq, lba, count } }));
      for (const b of found) {
        if (b < lba || b >= lba + count)
          throw new Error(`replica ${this.address} named block ${b} outside its scrub`);
        this.markDirty(b, 1);
        damaged.push(b);
      }
    }
    if (damaged.length)
      this.log.warn(
        `replica ${this.address} of ${this.volumeName} holds ${damaged.length} damaged block(s): sending them again`,
      );
    return damaged;
  }

  /**
   * --max-rate: a token bucket (at most a second's worth) spent by the sync's block data
   * as it goes, and waited out before the next sync batch. Clients' batches never wait.
   */
  private refill(): void {
    const rate = this.opts.maxRate;
    const now = Date.now();
    this.tokens = Math.min(rate, this.tokens + ((now - this.tokensAt) / 1000) * rate);
    this.tokensAt = now;
  }

  private spend(bytes: number): void {
    if (!this.opts.maxRate) return;
    this.refill();
    this.tokens -= bytes;
  }

  /** How long the sync must wait before its next batch, in ms. */
  private rateWait(): number {
    if (!this.opts.maxRate) return 0;
    this.refill();
    return this.tokens >= 0 ? 0 : Math.ceil((-this.tokens / this.opts.maxRate) * 1000);
  }

  /** Sends a verify frame (made in the tick it goes, after this tick's batch) and waits for its answer. */
  private request(make: () => Frame): Promise<number[]> {
    const link = this.link;
    if (!link || (this.state !== 'in-sync' && this.state !== 'syncing'))
      return Promise.reject(new Error(`replica ${this.address} is ${this.state}: verify needs its link up`));
    this.sendFilling();
    const frame = make();
    // Every request's body carries the sequence number its answer comes back under.
    const seq = (Object.values(frame)[0] as { seq: number }).seq;
    const answer = this.awaitAnswer(this.verifying, seq, 'verify');
    link.send(frame);
    return answer;
  }

  /** Stops mirroring; `forget` deletes the activity log (the replica was removed). */
  close(forget = false): void {
    if (this.closed) return;
    this.closed = true;
    this.detach();
    this.answered();
    if (!forget) this.settleLog();
    void this.al.close(forget).catch(() => undefined);
    if (this.pumpTimer) clearTimeout(this.pumpTimer);
    clearInterval(this.watchdog);
    if (this.retry) clearTimeout(this.retry);
    // Removing the replica, or closing the volume (the gateway stopping): said as such,
    // and a clean stop is no warning.
    this.dropLink(forget ? 'replica removed' : 'mirror closed (volume closed or gateway stopping)', !forget);
    this.link?.close();
  }

  // ---- batches -------------------------------------------------------------------------

  /** The batch this tick's writes go into; sent once the tick is over. */
  private batchFor(blocks: number): Batch {
    if (this.filling && this.filling.blocks + blocks > BATCH_BLOCKS) this.sendFilling();
    if (!this.filling) {
      this.filling = { seq: 0, ranges: [], blocks: 0, durable: false, sentAt: 0, waiters: [] };
      setImmediate(() => this.sendFilling());
    }
    return this.filling;
  }

  /** A batch acknowledged, or given up on: its blocks no longer count against the buffer. */
  private settled(batch: Batch): void {
    if (!batch.resync) this.unackedBlocks -= batch.blocks;
  }

  private sendFilling(): void {
    const batch = this.filling;
    if (!batch) return;
    this.filling = null;
    this.send(batch);
  }

  private send(batch: Batch): void {
    const link = this.link;
    if (!link || (this.state !== 'in-sync' && this.state !== 'syncing')) {
      this.settled(batch);
      for (const r of batch.ranges) this.markDirty(r.lba, r.kinds.length);
      for (const w of batch.waiters) w();
      return;
    }
    batch.seq = ++this.seq;
    batch.sentAt = Date.now();
    this.inflight.push(batch);
    if (batch.resync) this.resyncInflight++;
    // A client's write of blocks this store has just written as new sends them with the
    // batch: the replica most likely lacks them too, and asking would cost a round trip
    // on every write. Syncs stay hash-first (the replica may hold much of the volume).
    const inline: WireBlock[] = [];
    if (!batch.resync) {
      let ordinal = 0;
      for (const r of batch.ranges)
        for (const src of r.sources) {
          // Once per block: a block repeated in later writes is on its way or there already.
          if (src.record && !this.inlined.has(src.id)) {
            inline.push({ ordinal, ...recordPayload(src.record) });
            this.inlined.add(src.id);
          }
          ordinal++;
        }
    }
    const frame: Frame = {
      batch: {
        seq: batch.seq,
        durable: batch.durable,
        extents: batch.ranges.map((r) => ({ lba: r.lba, kinds: r.kinds, cids: r.cids })),
        ...(inline.length ? { blocks: inline } : {}),
      },
    };
    link.send(frame);
    this.sentBatches++;
    this.sentBlocks += inline.length;
  }

  /**
   * The initial sync and every resync: the dirty chunks' current states, a window at a
   * time, and no faster than --max-rate (checked before a batch goes, so clients' batches
   * never queue behind block data held back).
   */
  private pump(): void {
    // Under --max-rate one sync batch at a time, so its block data is spent before the next goes.
    const window = this.opts.maxRate ? 1 : WINDOW;
    while (this.link && this.resyncInflight < window && this.dirty.size > 0) {
      const wait = this.rateWait();
      if (wait > 0) {
        this.schedulePump(wait);
        break;
      }
      const chunk = this.dirty.next();
      const lba = chunk * CHUNK_BLOCKS;
      const count = Math.min(CHUNK_BLOCKS, this.volumeBlocks - lba);
      let range: CapturedRange;
      try {
        range = this.store.captureRange(this.volumeId, lba, count);
      } catch (err) {
        this.dirty.add(chunk);
        this.lastError = `capture of chunk ${chunk}: ${(err as Error).message}`;
        this.log.error(`mirror of ${this.volumeName} to ${this.address}: ${this.lastError}`);
        this.schedulePump(RETRY_MS);
        return;
      }
      this.sendFilling();
      this.send({
        seq: 0,
        ranges: [range],
        blocks: count,
        durable: false,
        sentAt: 0,
        waiters: [],
        resync: true,
      });
    }
    // In sync once no sync batch is owed or in flight (clients' batches may always be).
    if (this.state === 'syncing' && this.dirty.size === 0 && this.resyncInflight === 0) {
      this.state = 'in-sync';
      this.log.info(`replica ${this.address} of ${this.volumeName} is in sync`);
    }
  }

  /** Blocks the replica may not have: their chunks go again (also for a change that failed half-way). */
  markDirty(lba: number, count: number): void {
    if (count === 0) return;
    const first = Math.floor(lba / CHUNK_BLOCKS);
    const last = Math.min(Math.floor((lba + count - 1) / CHUNK_BLOCKS), this.dirty.chunks - 1);
    for (let c = first; c <= last; c++) this.dirty.add(c);
    if (this.state === 'in-sync') {
      this.state = 'syncing';
      this.schedulePump(0);
    }
  }

  /**
   * The replica holds exactly the seed bundle: what it lacks is what changed since the
   * export point (the snapshot), so only those chunks stay dirty. The blocks changed
   * are found from the snapshot's preserved entries, in proportion to the changes.
   */
  private seededDirty(snapshot: number): void {
    this.dirty.clear();
    const blocks = this.volumeBlocks;
    for (const { lba } of this.store.changedBlocks(snapshot, blocks, this.volumeId, blocks))
      this.dirty.add(Math.floor(lba / CHUNK_BLOCKS));
    this.log.info(
      `replica ${this.address} of ${this.volumeName} holds the seed: ${this.dirty.size} chunk(s) changed since`,
    );
  }

  private markAllDirty(): void {
    for (let c = 0; c < this.dirty.chunks; c++) this.dirty.add(c);
    this.syncTotal = this.dirty.chunks;
  }

  private schedulePump(ms: number): void {
    if (this.pumpTimer) return;
    this.pumpTimer = setTimeout(() => {
      this.pumpTimer = null;
      if (!this.closed) this.pump();
    }, ms);
    this.pumpTimer.unref();
  }

  // ---- the link ------------------------------------------------------------------------

  private connect(): void {
    if (this.closed) return;
    this.state = 'connecting';
    connectLink(this.to.host, this.to.port, this.me).then(
      (link) => this.linkUp(link),
      (err: Error) => this.linkFailed(err),
    );
  }

  private linkFailed(err: Error): void {
    this.lastError = (err as { code?: string }).code
      ? `${(err as { code?: string }).code}: ${err.message}`
      : err.message;
    if (this.closed) return;
    this.retry = setTimeout(() => this.connect(), RETRY_MS);
    this.retry.unref();
  }

  private linkUp(link: Link): void {
    if (this.closed) {
      link.close();
      return;
    }
    this.link = link;
    this.peer = link.peerId;
    link.onFrame = (f) => {
      try {
        this.onFrame(link, f);
      } catch (err) {
        if (err instanceof LinkProtocolError) link.fail(err);
        else throw err;
      }
    };
    link.onError = (err) => {
      this.lastError = `${(err as { code?: string }).code ?? 'error'}: ${err.message}`;
    };
    link.socket.on('close', () => {
      if (this.link === link) this.dropLink(this.lastError ?? 'link closed');
      this.linkFailed(new Error(this.lastError ?? 'link closed'));
    });
    link.start();
    link.send({
      mirror: {
        volume: this.volumeName,
        size: this.volumeBlocks * 4096,
        domain: this.store.contentDomain(),
        generation: this.opts.generation,
        ...(this.opts.seed ? { seed: this.opts.seed.bundleId } : {}),
      },
    });
  }

  /** The link is gone or stalled: what was in flight is owed again, and nobody waits for it. */
  private dropLink(why: string, expected = false): void {
    const link = this.link;
    this.link = null;
    this.peer = null;
    this.sentBytes += link?.bytesOut ?? 0;
    if (this.state !== 'connecting') {
      const msg = `replica ${this.address} of ${this.volumeName}: ${why}`;
      if (expected) this.log.info(msg);
      else this.log.warn(msg);
    }
    this.state = this.closed ? 'connecting' : 'behind';
    this.resyncInflight = 0;
    for (const b of this.inflight.splice(0)) {
      this.settled(b);
      for (const r of b.ranges) this.markDirty(r.lba, r.kinds.length);
      for (const w of b.waiters) w();
    }
    // The replica may have lost them if it crashed: they go again.
    for (const r of this.volatile) this.markDirty(r.lba, r.count);
    this.volatile = [];
    if (this.filling) this.sendFilling();
    for (const w of [...this.verifying.values(), ...this.fetching.values()])
      w.reject(new Error(`replica ${this.address}: ${why}`));
    this.verifying.clear();
    this.fetching.clear();
    link?.socket.destroy();
  }

  private checkStall(): void {
    if (Date.now() - this.settledAt >= SETTLE_LOG_MS) {
      this.settledAt = Date.now();
      this.settleLog();
    }
    if (
      this.link &&
      this.volatile.length > 0 &&
      Date.now() - this.volatileSince >= DURABLE_EVERY_MS &&
      !this.inflight.some((b) => b.durable)
    ) {
      this.batchFor(0).durable = true;
    }
    const oldest = this.inflight[0];
    // Silence since the oldest batch went, or since the last acknowledgement if later:
    // batches wait in order behind one held by --max-rate, and are not stalled for it.
    const since = oldest ? Math.max(oldest.sentAt, this.lastAckAt ?? 0) : 0;
    if (this.link && oldest && Date.now() - since > this.opts.timeoutMs) {
      this.lastError = `no acknowledgement for ${this.opts.timeoutMs} ms`;
      this.dropLink(`${this.lastError}: behind, writes go on without it`);
    }
  }

  private onFrame(link: Link, f: Frame): void {
    if ('mirrorReady' in f) {
      if (this.state !== 'connecting')
        throw new LinkProtocolError('ERR_LINK_UNEXPECTED', 'second mirrorReady');
      this.state = 'syncing';
      this.answered();
      if (f.mirrorReady.seeded && this.opts.seed) this.seededDirty(this.opts.seed.snapshot);
      this.syncTotal = this.dirty.size;
      this.log.info(
        `replica ${this.address} (gateway ${link.peerId}) of ${this.volumeName}: ${this.dirty.size} chunks to sync`,
      );
      this.pump();
      return;
    }
    if ('need' in f) {
      const batch = this.inflight.find((b) => b.seq === f.need.seq);
      if (!batch)
        throw new LinkProtocolError('ERR_LINK_UNEXPECTED', `need for batch ${f.need.seq}, not in flight`);
      this.sendBlocks(link, batch, f.need.ordinals);
      return;
    }
    if ('ack' in f) {
      const head = this.inflight[0];
      if (!head || head.seq !== f.ack.seq)
        throw new LinkProtocolError('ERR_LINK_UNEXPECTED', `ack for batch ${f.ack.seq} out of order`);
      this.inflight.shift();
      this.settled(head);
      if (head.resync) this.resyncInflight--;
      this.lastAckAt = Date.now();
      if (head.durable) this.volatile = [];
      else {
        if (this.volatile.length === 0) this.volatileSince = Date.now();
        for (const r of head.ranges) this.volatile.push({ lba: r.lba, count: r.kinds.length });
      }
      for (const w of head.waiters) w();
      this.pump();
      return;
    }
    if ('error' in f) {
      this.lastError = `${f.error.code}: ${f.error.message}`;
      this.log.error(`replica ${this.address} refused ${this.volumeName}: ${this.lastError}`);
      this.dropLink(this.lastError);
      this.answered();
      return;
    }
    if ('superseded' in f) {
      // No reconnecting: the peer holds a newer generation, and writes here stop (split brain).
      this.lastError = `superseded: the copy at ${this.address} is at generation ${f.superseded.generation}`;
      this.log.error(`replica ${this.address} of ${this.volumeName}: ${this.lastError}; split brain`);
      // Writes waiting for this replica never reached the volume's newer primary: they fail.
      const err = new BlockError('EPERM', `volume ${this.volumeName} was superseded at ${this.address}`);
      for (const b of this.inflight.splice(0)) for (const w of b.waiters) w(err);
      if (this.filling) {
        for (const w of this.filling.waiters) w(err);
        this.filling = null;
      }
      this.unackedBlocks = 0;
      this.close();
      this.state = 'superseded';
      this.opts.onSuperseded(link.peerId, f.superseded.generation);
      this.answered(); // after it: the writes held now meet the split brain
      return;
    }
    if ('verifyChunksResult' in f || 'verifyBlocksResult' in f || 'scrubBlocksResult' in f) {
      const [seq, blocks] =
        'scrubBlocksResult' in f
          ? [f.scrubBlocksResult.seq, f.scrubBlocksResult.damaged]
          : 'verifyChunksResult' in f
            ? [f.verifyChunksResult.seq, f.verifyChunksResult.mismatched]
            : [f.verifyBlocksResult.seq, f.verifyBlocksResult.mismatched];
      const w = this.verifying.get(seq);
      if (!w) throw new LinkProtocolError('ERR_LINK_UNEXPECTED', `verify answer ${seq}, not asked`);
      this.verifying.delete(seq);
      w.resolve(blocks);
      return;
    }
    if ('blocks' in f) {
      const w = this.fetching.get(f.blocks.seq);
      if (!w) throw new LinkProtocolError('ERR_LINK_UNEXPECTED', `blocks ${f.blocks.seq}, none asked for`);
      this.fetching.delete(f.blocks.seq);
      w.resolve(f.blocks.blocks);
      return;
    }
    if ('pong' in f) return;
    if ('cutoverDone' in f) {
      if (!this.cutoverDone)
        throw new LinkProtocolError('ERR_LINK_UNEXPECTED', 'cutoverDone, no cutover asked');
      this.cutoverDone(f.cutoverDone.generation);
      return;
    }
    throw new LinkProtocolError('ERR_LINK_UNEXPECTED', `${Object.keys(f)[0]} from a replica`);
  }

  private sendBlocks(link: Link, batch: Batch, ordinals: number[]): void {
    const sources: BlockSource[] = batch.ranges.flatMap((r) => r.sources);
    const wanted: Array<{ ordinal: number; src: BlockSource }> = [];
    for (const o of ordinals) {
      const src = sources[o];
      if (!src)
        throw new LinkProtocolError(
          'ERR_LINK_MALFORMED',
          `need for block ${o} of a batch of ${sources.length}`,
        );
      wanted.push({ ordinal: o, src });
    }
    Promise.all(
      wanted.map(async ({ ordinal, src }): Promise<WireBlock> => ({
        ordinal,
        ...(await this.store.sourcePayload(src)),
      })),
    ).then(
      (blocks) => {
        if (this.link !== link) return;
        link.send({ blocks: { seq: batch.seq, blocks } });
        this.sentBlocks += blocks.length;
        if (batch.resync) this.spend(blocks.reduce((n, b) => n + b.payload.length, 0));
      },
      (err: Error) => {
        // A block compacted away since its capture, or damaged: send its chunk again, as it is now.
        this.lastError = `reading blocks for batch ${batch.seq}: ${err.message}`;
        if (this.link === link) this.dropLink(this.lastError);
      },
    );
  }
}

/** Chunks the replica may lack: a bitmap, taken in order from a cursor that wraps. */
class DirtyChunks {
  private readonly bits: Uint8Array;
  private count = 0;
  private cursor = 0;

  constructor(readonly chunks: number) {
    this.bits = new Uint8Array(chunks);
  }

  get size(): number {
    return this.count;
  }

  has(c: number): boolean {
    return this.bits[c] === 1;
  }

  add(c: number): void {
    if (this.bits[c]) return;
    this.bits[c] = 1;
    this.count++;
    if (c < this.cursor) this.cursor = c;
  }

  /** The lowest dirty chunk at or after the cursor (the caller checked size > 0); cleared. */
  next(): number {
    for (let i = 0; i < this.chunks; i++) {
      const c = (this.cursor + i) % this.chunks;
      if (this.bits[c]) {
        this.bits[c] = 0;
        this.count--;
        this.cursor = c + 1;
        return c;
      }
    }
    throw new Error('no dirty chunk');
  }

  clear(): void {
    this.bits.fill(0);
    this.count = 0;
    this.cursor = 0;
  }
}
