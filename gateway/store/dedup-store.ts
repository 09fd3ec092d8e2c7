// The deduplicating block store shared by every dedup volume of a gateway.
//
//   metamap   (volume, block) -> block id            LMDB "meta-pages" (meta-pages.ts)
//   datamap   block id -> segment record, refcount   LMDB "data-pages" (data-pages.ts)
//   hash      keyed XXH3-128 -> block id             in memory (hash-index.ts)
//   segments  append-only files of lz4 records       segments.ts
//   reads     metamap -> datamap -> record, checked  block-reader.ts
//
// Crash safety: changes collect in an Overlay. A checkpoint (FLUSH, FUA, a
// timer, or a full overlay) freezes it, makes the segment files durable,
// then commits the frozen changes to LMDB and waits until they are durable
// too. After a crash the index is exactly the last checkpoint, and it never
// points at segment bytes that were not on disk first: writes since then are
// lost as from a volatile cache, but no block reads as garbage.

import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Database, RootDatabase } from 'lmdb';
import { openIndex } from './index-db';
import { convertLegacyRows, dataEntries, dataPageKeyInto, dataPageNumber, entryOffset } from './data-pages';
import { BlockError } from '../device/errors';
import { native } from '../../native-bindings';
import { sharedBufferPool } from '../util/buffer-pool';
import type { Logger } from '../util/log';
import {
  BlockHasher,
  CorruptBlockError,
  decodeRecordInto,
  encodeRecord,
  encodeRecordInto,
  isZeroBlock,
  recordPayload,
  unpackPayload,
  unpackRecordInto,
  writeRecordInto,
} from './block-codec';
import { BatchView, PACKED_RAW, PACKED_ZERO } from './block-batch';
import { BlockPool } from './block-pool';
import {
  BLOCK,
  DataEntry,
  EntryFlag,
  MASK_BLOCK,
  RECORD_HEADER,
  ZERO_BLOCK,
  decodeDataEntryAt,
  encodeIdInto,
  metaKey,
  metaKeyLba,
  metaKeyVolume,
} from './layout';
import { META_SLOTS, convertLegacyMeta, forEachMeta, lookupMetaPage, metaPageDamaged } from './meta-pages';
import { HOLE, MovedRecord, Overlay } from './overlay';
import { KIND_DATA, KIND_ZERO } from '../../protocol/replication/block-kinds';
import { META_PAGE, MetaCache, MetaPage, pageKey } from './meta-cache';
import { BlockReader } from './block-reader';
import { SegmentFiles } from './segments';
import { RecentRecords } from './recent-records';
import { PendingRecords } from './pending-records';
import { HashIndex } from './hash-index';
import { TreeError, TreeState, VolumeTree, isData } from './volume-tree';
import { CheckpointReply, CheckpointTables } from './checkpoint-message';
import { NumMap } from './num-map';
import { settleAll } from '../util/settle-all';
import { IndexWriter } from './index-writer';

/**
 * Checkpoint at least this often while there are changes. FLUSH and FUA checkpoint
 * at once; this bounds what a crash can lose from clients that never flush (ZFS
 * commits its transaction groups on the same 5 s rhythm). Shorter intervals pin
 * sustained writes to the disk's sync speed.
 */
const CHECKPOINT_INTERVAL_MS = 5000;
/** ... and as soon as the overlay holds this many changes. */
const CHECKPOINT_ENTRIES = 50_000;
/**
 * Volume ids stay below this: a metamap key (volume * 2^40 + block, layout.ts) must be an
 * exact double. Past it, ids of deleted volumes are reused (freeVolumeId).
 */
const VOLUME_IDS = 2 ** 13;
/** An empty sealed segment is removed at the first commit this long after it emptied. */
const EMPTY_SEGMENT_GRACE_MS = 500;
/** Writes wait for the running checkpoint once the next overlay has grown this big (bounds its memory). */
const DEFAULT_OVERLAY_LIMIT = 2 * CHECKPOINT_ENTRIES;
/** Checkpoints a throttled write waits through at most before it goes ahead anyway. */
const THROTTLE_ROUNDS = 10;
/**
 * Record buffers of single-block writes kept for reuse. A new 4 KiB buffer per write was
 * external memory V8 answered with collections: about half the garbage collection of a
 * 4k random write (9.1 -> 4.8 ms per thousand writes, profiled).
 */
const RECORD_BUFFERS_KEPT = 256;

export type BlockState = 'hole' | 'zero' | 'data';

export interface StoreOptions {
  readOnly?: boolean;
  /**
   * Writes of at least this many bytes are hashed and compressed on the encoding
   * pool; null: always inline (and no pool threads).
   */
  hashPoolMin?: number | null;
  /** Overlay changes past which writes wait for the running checkpoint (tests lower it). */
  overlayLimit?: number;
  /** Overlay changes that start a checkpoint (tests lower it). */
  checkpointEntries?: number;
  /** Memory for the metamap's in-memory pages (meta-cache.ts); 0 turns them off. */
  metaCacheBytes?: number;
  /** How long an empty sealed segment stays readable before it is removed (tests lower it). */
  emptySegmentGraceMs?: number;
  /**
   * The cluster key, when the gateway has one: a new store derives its hashing secret
   * from it, so every store of the cluster names a block by the same content id and
   * mirroring can send ids first (hash-first). Nobody outside the cluster knows it.
   */
  secretSeed?: Buffer;
}

/** The hashing secret a new store of the cluster with this key gets. */
export function clusterSecret(seed: Buffer): Buffer {
  return Buffer.from(crypto.hkdfSync('sha256', seed, Buffer.alloc(0), 'blockgate-store-secret-v1', 192));
}

/** Names a hashing secret's content-id domain without revealing the secret. */
export function contentDomain(secret: Buffer): Buffer {
  return crypto.createHmac('sha256', secret).update('blockgate-content-domain-v1').digest().subarray(0, 16);
}

/**
 * A block a replica received: the payload as stored on the primary (lz4 or raw).
 * applyMirrored decodes it to check it against its content id, and stores it as it came.
 */
export interface MirroredBlock {
  payload: Buffer;
  lz4: boolean;
}

/** A block a mirrored batch brings that this store lacks, and the ordinals that carry it. */
interface FreshMirrored {
  block: MirroredBlock;
  hash: Buffer;
  ordinals: number[];
}

/** Where a mirrored block's bytes are on the primary, for when the replica asks for them. */
export interface BlockSource {
  id: number;
  hash: Buffer;
  segment: number;
  offset: number;
  storedLength: number;
  /** The whole record while its segment write is in flight. */
  record: Buffer | undefined;
}

/** A range's state as mirroring sends it: a kind per block, content ids of its data blocks. */
export interface CapturedRange {
  lba: number;
  kinds: Buffer;
  cids: Buffer;
  sources: BlockSource[];
}

/** 128 MiB of pages holds the metamap of about 28 GiB of volume blocks. */
export const DEFAULT_META_CACHE_BYTES = 128 * 1024 * 1024;

/**
 * The pool only pays where there are cores to spare: on 2 cores the event loop,
 * the index writer and the client already use both, and scripts/bench measured
 * 1 MiB writes slower with the pool (blockgate-dedup-pool) than without.
 */
export const DEFAULT_HASH_POOL_MIN = os.availableParallelism() >= 4 ? 256 * 1024 : null;

// matchNow's answers besides a block id (ids start at 1).
const NO_MATCH = 0;
const COLLISION = -1;
const WAIT = -2;
/** Rounds of settle() before a write stops trying to share and stores its own copy. */
const SETTLE_TRIES = 3;

const RESOLVED = Promise.resolve();
/** Records remember() keeps: a few MiB, what mirrors ask for within a round trip or two. */
const RECENT_RECORDS = 2048;

/**
 * A write with at least this many new blocks has them lz4-packed on the libuv pool
 * (native encodeRecords), in one job: below it the hand-off costs more than the
 * packing it moves off the event loop (about 1.5 us a block).
 */
const POOL_ENCODE_MIN = 64;

/** Blocks a scrub reads at a time: one pool job for a volume laid out in order. */
const SCRUB_WINDOW = 256;
/** A scrub that yields to clients sleeps this many times each busy window's read. */
const SCRUB_YIELD = 3;

/** A pooled slab's segment write, once started. */
interface SlabUse {
  written: Promise<void> | null;
}

/** A block of a write request stored as a new record (storeInto). */
interface Fresh {
  key: number;
  /** Its index in the request. */
  index: number;
  id: number;
  /** Where its record is in the request's slab. */
  at: number;
  length: number;
  hash: Buffer;
  indexed: boolean;
  /** The mapping it replaced, put back if its segment write fails. */
  old: number | undefined;
}

/** A plain move of a record a mend wrote (not yet committed): it keeps the mend's length and flags. */
function keepMend(move: MovedRecord, earlier: MovedRecord | undefined): MovedRecord {
  if (move.storedLength !== undefined || earlier?.storedLength === undefined) return move;
  return { ...move, storedLength: earlier.storedLength, flags: earlier.flags };
}

/** A block of a write request that repeats an earlier new block of the same request. */
interface Repeat {
  key: number;
  of: Fresh;
  old: number | undefined;
}

interface Fetched {
  id: number;
  record: Buffer;
}

interface StoreState {
  version: 1;
  secret: string;
  nextBlockId: number;
  nextVolumeId: number;
  volumes: Record<string, number>;
  uniqueBlocks: number;
  storedBytes: number;
  /** Written with each checkpoint (the sum of volumeBlocks), for fsck; counted from volumeBlocks. */
  mappedBlocks: number;
  zeroBlocks: number;
  collisions: number;
  /**
   * Store volume id -> blocks its own metamap entries map to data (what `volume list`
   * shows as allocated). Absent in stores written before 2026-11-26: counted at open.
   */
  volumeBlocks?: Record<string, number>;
  /** Bytes of live records per segment number (what compaction must keep). */
  segmentLive: Record<string, number>;
  /** Blocks kept at reference count zero, for the next checkpoint to delete if untouched. */
  zeroRef?: number[];
  /** Snapshots and clones: which volume reads fall through to. */
  tree?: TreeState;
  /**
   * Checkpoints committed so far. The index writer takes only the next one, and a
   * store that lost a commit's reply learns from it whether the commit landed.
   */
  commitSeq?: number;
  /** Made afresh for every commit attempt: says which attempt landed, not only which number. */
  commitToken?: string;
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
  /** Files of removed segments kept to be written over as new ones (segments.ts). */
  spareBytes: number;
  dedupRatio: number;
  compressionRatio: number;
  collisions: number;
  /** Pages the index's trees use. */
  indexBytes: number;
  /** The index file, with LMDB's free pages. */
  indexFileBytes: number;
  indexBytesPerBlock: number;
  /** Memory of the content-hash index (16 bytes a slot, at most 70% full). */
  hashIndexBytes: number;
}

function stateOf(id: number): BlockState {
  return id === HOLE || id === MASK_BLOCK ? 'hole' : id === ZERO_BLOCK ? 'zero' : 'data';
}

export class DedupStore {
  private live = new Overlay();
  /** The next live overlay, empty: the two swap at every checkpoint, so their tables are reused. */
  private spare = new Overlay();
  private frozen: Overlay | null = null;
  /**
   * Blocks a running checkpoint is deleting. Its transaction removes them at once, but
   * reads see the index as last committed until the commit lands, and a write must not
   * link to a block on its way out in between.
   */
  private readonly dying = new NumMap();
  /**
   * Blocks the running checkpoint takes references from: it deletes those it leaves with
   * none in the same commit. Until it lands nothing may link to them by content (a
   * duplicate gets stored instead); reads and existing mappings still reach them.
   */
  private readonly releasing = new NumMap();
  /**
   * Set when a commit failed and reading the index to learn whether it landed failed
   * too: committing the changes again could count them twice, and dropping them could
   * lose them, so nothing commits until a restart opens the store at what the index holds.
   */
  private indexFailure: BlockError | null = null;
  /** Client reads and writes served so far: the compactor slows down while it moves. */
  foregroundOps = 0;
  /**
   * When (performance.now()) the last checkpoint that committed froze its overlay: every change
   * made before then is durable here. A mirror's activity log unmarks a chunk only once
   * its last change is older (mirror.ts, settleLog).
   */
  durableAsOf = performance.now();
  private readonly pending = new PendingRecords();
  private readonly requestHashes = new NumMap(1024);
  /** The latest records written, by block id (oldest first), for mirrors (remember()). */
  private readonly recent = new RecentRecords(RECENT_RECORDS, RECORD_HEADER + BLOCK);
  // Scratch for the synchronous paths, which never await while holding them.
  private readonly metaKeyBuf = Buffer.allocUnsafe(12);
  private readonly idKeyBuf = Buffer.allocUnsafe(8);
  private readonly recordBuffers: Buffer[] = [];
  /** Datamap pages found damaged, each logged once. */
  private readonly damagedPages = new Set<number>();
  /** Datamap pages the index writer reported damaged (their counts leak), each logged once. */
  private readonly leakingPages = new Set<number>();
  private readonly recordScratch = Buffer.allocUnsafe(RECORD_HEADER + BLOCK);
  private readonly blockScratch = Buffer.allocUnsafe(BLOCK);
  private readonly mirrorScratch = Buffer.allocUnsafe(BLOCK);
  /**
   * A checkpoint the overlay's size called for starts in a microtask, never inside the
   * synchronous change that filled the overlay: freezing half of one would split new
   * blocks from their references, or a write's mappings from what undoes them.
   */
  private checkpointQueued = false;
  /**
   * The replaced mappings of writes whose segment write is in flight (each item's
   * `old`): a failed write puts them back, so a checkpoint must not delete them meanwhile.
   */
  private readonly undoable = new Set<ReadonlyArray<{ old: number | undefined }>>();
  /** New blocks of mirrored batches whose segment write is in flight, with who placed them (unsettledBlock). */
  private readonly mirrorPlaced = new Map<number, object>();
  /**
   * Copies a scrub found damaged, by content hash (hex): a new record of the same content
   * (a client's write, a replica's resync) mends them in place too, so snapshots and clones
   * sharing one read it again. Rare, so looked at only while it holds any.
   */
  private readonly damagedCopies = new Map<string, number>();
  /** First keys of the metamap tree's 16-block pages found damaged (metaDamaged). */
  private readonly damagedMeta = new Set<number>();
  /** verify's chunk digests by page key (chunks are metamap pages), dropped by setMeta. */
  private readonly digests = new Map<number, { count: number; digest: Buffer }>();
  private readonly hasher: BlockHasher;
  private checkpointing: Promise<void> | null = null;
  private nextCheckpoint: Promise<void> | null = null;
  private readonly timer: NodeJS.Timeout;
  private closed = false;
  private readonly writer: IndexWriter;
  private readonly tables = new CheckpointTables();
  private readonly pool: BlockPool | null;
  /** The index's data file, as /proc/self/maps names it. */
  private readonly indexFile: string;
  /** Blocks at reference count zero in the index (the writer's last word on it). */
  private readonly zeroRef = new NumMap();
  /** Mirrors of this store's volumes running now: recent records are kept only for them. */
  private mirrorsAttached = 0;
  /** Sealed segments found empty at a commit, and when (retireDeadSegments). */
  private readonly emptySince = new Map<number, number>();
  /** state.volumeBlocks as it moves (with the live overlay); written out with each checkpoint. */
  private readonly volumeBlocks = new NumMap();
  /** Snapshots and clones, linked to the volumes they read through to. */
  private readonly tree: VolumeTree;
  /** Content hash -> block id, in memory (hash-index.ts), rebuilt from the datamap at open. */
  private readonly hashIndex: HashIndex;
  /** The read path (block-reader.ts), reading through this store's maps and overlays. */
  private readonly reader: BlockReader;

  private constructor(
    readonly dir: string,
    private readonly env: RootDatabase,
    private readonly metaDb: Database<Buffer, Buffer>,
    private readonly dataDb: Database<Buffer, Buffer>,
    private readonly hashDb: Database<Buffer, Buffer>,
    private readonly stateDb: Database<unknown, string>,
    private state: StoreState,
    readonly segments: SegmentFiles,
    private readonly log: Logger,
    /** Writes of at least this many blocks are encoded on the pool. */
    private readonly poolMinBlocks: number,
    private readonly overlayLimit: number,
    private readonly cache: MetaCache,
    private readonly checkpointEntries: number,
    private readonly emptySegmentGraceMs: number,
  ) {
    this.pool = Number.isFinite(poolMinBlocks) ? new BlockPool(state.secret) : null;
    this.hasher = new BlockHasher(Buffer.from(state.secret, 'base64'));
    this.reader = new BlockReader({
      segments,
      hasher: this.hasher,
      pending: this.pending,
      log,
      cacheEnabled: () => this.cache.enabled,
      linked: (volume) => this.tree.linked(volume),
      metaPage: (key) => this.metaPage(key),
      metaDamaged: (key) => this.metaDamaged(key),
      anyMetaDamaged: () => this.damagedMeta.size > 0,
      resolveMeta: (volume, lba) => this.resolveMeta(volume, lba),
      lookupData: (id) => this.lookupData(id),
      blockIds: (volume, lba, count) => this.blockIds(volume, lba, count),
      volumeName: (volume) => this.volumeName(volume),
    });
    this.indexFile = fs.realpathSync(path.join(dir, 'index', 'data.mdb'));
    this.writer = new IndexWriter(dir);
    for (const id of state.zeroRef ?? []) this.zeroRef.set(id, 1);
    if (state.volumeBlocks)
      for (const [v, n] of Object.entries(state.volumeBlocks)) this.volumeBlocks.set(Number(v), n);
    else this.countVolumeBlocks();
    this.hashIndex = this.buildHashIndex();
    this.tree = new VolumeTree(state.tree, {
      own: (key) => this.lookupMeta(key),
      setOwn: (key, value) => this.setMeta(key, value ?? HOLE),
      ownBlocks: (volume) => this.ownBlocks(volume),
    });
    this.timer = setInterval(() => {
      if (this.live.size > 0 && !this.checkpointing)
        this.flush().catch((e) => this.log.error(`checkpoint: ${e}`));
    }, CHECKPOINT_INTERVAL_MS);
    this.timer.unref();
  }

  static open(dir: string, log: Logger, opts: StoreOptions = {}): DedupStore {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    const {
      env,
      meta: metaDb,
      legacyMeta,
      data: dataDb,
      legacyData,
      hash: hashDb,
      state: stateDb,
    } = openIndex(dir, opts);
    if (!dataDb || (opts.readOnly && legacyData && legacyData.getKeysCount() > 0))
      throw new Error(`${dir}: the store's datamap predates pages; open it once read-write to convert it`);
    if (!metaDb || (opts.readOnly && legacyMeta && legacyMeta.getKeysCount() > 0))
      throw new Error(`${dir}: the store's metamap predates pages; open it once read-write to convert it`);
    let state = stateDb.get('store') as StoreState | undefined;
    if (!state) {
      if (opts.readOnly) throw new Error(`${dir} holds no dedup store`);
      state = {
        version: 1,
        secret: (opts.secretSeed ? clusterSecret(opts.secretSeed) : crypto.randomBytes(192)).toString(
          'base64',
        ),
        nextBlockId: 1,
        nextVolumeId: 1,
        volumes: {},
        uniqueBlocks: 0,
        storedBytes: 0,
        mappedBlocks: 0,
        zeroBlocks: 0,
        collisions: 0,
        volumeBlocks: {},
        segmentLive: {},
      };
      stateDb.putSync('store', state);
    }
    state.segmentLive ??= {};
    // Stores written before the hash index moved to memory kept it as an LMDB tree:
    // emptied once, so nothing pays for keeping it.
    if (!opts.readOnly && hashDb.getKeysCount() > 0) hashDb.clearSync();
    if (!opts.readOnly && legacyData) {
      const moved = convertLegacyRows(env, legacyData, dataDb);
      if (moved) log.info(`datamap: ${moved} entries converted to pages`);
    }
    if (!opts.readOnly && legacyMeta) {
      const moved = convertLegacyMeta(env, legacyMeta, metaDb);
      if (moved) log.info(`metamap: ${moved} entries converted to pages`);
    }
    const segments = new SegmentFiles(path.join(dir, 'segments'), (err) => log.error(err.message));
    const poolMin = opts.readOnly
      ? null
      : opts.hashPoolMin === undefined
        ? DEFAULT_HASH_POOL_MIN
        : opts.hashPoolMin;
    const poolMinBlocks = poolMin === null ? Infinity : Math.max(1, Math.ceil(poolMin / BLOCK));
    const overlayLimit = opts.overlayLimit ?? DEFAULT_OVERLAY_LIMIT;
    return new DedupStore(
      dir,
      env,
      metaDb,
      dataDb,
      hashDb,
      stateDb,
      state,
      segments,
      log,
      poolMinBlocks,
      overlayLimit,
      new MetaCache(opts.metaCacheBytes ?? DEFAULT_META_CACHE_BYTES),
      opts.checkpointEntries ?? CHECKPOINT_ENTRIES,
      opts.emptySegmentGraceMs ?? EMPTY_SEGMENT_GRACE_MS,
    );
  }

  // ---- volumes ---------------------------------------------------------------------

  /** The store's id for a volume, if it has one yet. */
  volumeIdIfAny(name: string): number | undefined {
    return this.state.volumes[name];
  }

  /** The store's id for a volume, allocated on first use. */
  volumeId(name: string): number {
    let id = this.state.volumes[name];
    if (id === undefined) {
      id = this.state.nextVolumeId < VOLUME_IDS ? this.state.nextVolumeId++ : this.freeVolumeId();
      this.state.volumes[name] = id;
    }
    return id;
  }

  /**
   * Once every volume id has been handed out (snapshots and clones take one each), one that
   * no volume holds now: with no metamap entry left (a deleted volume's are all removed before
   * its name goes), none in the overlays, and no place in the snapshot tree.
   */
  private freeVolumeId(): number {
    const held = new Set(Object.values(this.state.volumes));
    const inOverlays = new Set<number>();
    for (const o of [this.live, this.frozen]) o?.meta.forEach((_v, k) => inOverlays.add(metaKeyVolume(k)));
    for (let id = 1; id < VOLUME_IDS; id++) {
      if (held.has(id) || inOverlays.has(id) || this.tree.mentions(id)) continue;
      let entries = false;
      const seen = (): void => {
        entries = true;
      };
      forEachMeta(this.metaDb, { volume: id, from: 0 }, seen, seen);
      if (!entries) return id;
    }
    throw new Error(`the store holds ${VOLUME_IDS - 1} volumes, snapshots and clones: no volume id is free`);
  }

  /** Each volume's data blocks, from the whole metamap: once, for a store that never counted them. */
  private countVolumeBlocks(): void {
    forEachMeta(
      this.metaDb,
      null,
      (volume, _lba, id) => {
        if (isData(id)) this.volumeBlocks.add(volume, 1);
      },
      (err) => this.log.error(err.message),
    );
  }

  /** Blocks the volume's own metamap entries map to data, acknowledged writes included. */
  volumeDataBlocks(volume: number): number {
    return this.volumeBlocks.get(volume) ?? 0;
  }

  /** Blocks mapped to data across all volumes (the state record's mappedBlocks). */
  private mappedBlocks(): number {
    let total = 0;
    this.volumeBlocks.forEach((n) => (total += n));
    return total;
  }

  /**
   * The hash index from the datamap, oldest block first (a copy stored past a collision
   * is newer than the block its hash belongs to).
   */
  private buildHashIndex(): HashIndex {
    const index = new HashIndex(Math.ceil((this.state.uniqueBlocks + 1024) / 0.7));
    // A damaged page's blocks are left out: their reads fail, and fsck names the page.
    const bad = (err: Error): void => this.log.error(err.message);
    for (const { id, entry } of dataEntries({ data: this.dataDb, legacyData: undefined }, bad)) {
      if ((entry.readUInt16BE(12) & EntryFlag.DAMAGED) === 0) index.add(entry.subarray(20, 36), id);
      else this.damagedCopies.set(entry.toString('hex', 20, 36), id);
    }
    return index;
  }

  /** Gives a store volume another name (an import done under a temporary one); durable with the next flush. */
  renameVolume(from: string, to: string): void {
    const id = this.state.volumes[from];
    if (id === undefined) throw new Error(`the store has no volume ${from}`);
    if (this.state.volumes[to] !== undefined) throw new Error(`the store already has a volume ${to}`);
    this.state.volumes[to] = id;
    delete this.state.volumes[from];
  }

  volumeNames(): string[] {
    return Object.keys(this.state.volumes);
  }

  /** Drops a volume's blocks from `fromLba` on (all of them for a delete). */
  async truncateVolume(volume: number, fromLba: number): Promise<void> {
    this.tree.truncate(volume, fromLba);
    await this.flush();
    const stored: number[] = [];
    forEachMeta(
      this.metaDb,
      { volume, from: fromLba },
      (_v, lba) => stored.push(lba),
      (err) => this.log.error(err.message),
    );
    for (const lba of stored) this.setMeta(metaKey(volume, lba), HOLE);
    // Both overlays: a checkpoint running meanwhile (a client's FLUSH) froze part of what was live.
    const overlaid = [...(this.frozen?.meta.keysOf() ?? []), ...this.live.meta.keysOf()];
    for (const k of overlaid) {
      if (metaKeyVolume(k) === volume && metaKeyLba(k) >= fromLba) this.setMeta(k, HOLE);
    }
    await this.flush();
  }

  async deleteVolume(name: string): Promise<void> {
    const id = this.state.volumes[name];
    if (id === undefined) return;
    // First, in one tick: an older snapshot gets the entries it reads through this one for.
    this.tree.unlink(id);
    await this.truncateVolume(id, 0);
    delete this.state.volumes[name];
    this.cache.dropVolume(id);
    this.digests.clear();
    await this.flush(true);
    await this.collect();
  }

  /** Block ids a volume maps to, with how many of its blocks map to each (zero blocks left out). */
  async volumeContents(volume: number): Promise<Map<number, number>> {
    await this.flush();
    const ids = new Map<number, number>();
    forEachMeta(this.metaDb, { volume, from: 0 }, (_v, _lba, id) => {
      if (isData(id)) ids.set(id, (ids.get(id) ?? 0) + 1);
    });
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
    forEachMeta(this.metaDb, { volume, from: 0 }, (_v, _lba, id) => {
      if (id === MASK_BLOCK) return;
      if (id === ZERO_BLOCK) {
        zeroBlocks++;
        return;
      }
      mappedBlocks++;
      if (this.lookupData(id)?.refcount === 1) exclusiveBlocks++;
    });
    return { mappedBlocks, zeroBlocks, exclusiveBlocks };
  }

  // ---- lookups: live overlay, then frozen, then the index -----------------------------

  private lookupMeta(key: number): number | undefined {
    const page = this.metaPage(key);
    if (page) {
      if (this.metaDamaged(key)) throw metaPageDamaged(metaKeyVolume(key), metaKeyLba(key));
      const id = page.ids[key % META_PAGE]!;
      return id === HOLE ? undefined : id;
    }
    let v = this.live.meta.get(key);
    if (v === undefined && this.frozen) v = this.frozen.meta.get(key);
    if (v !== undefined) return v === HOLE ? undefined : v;
    return lookupMetaPage(this.metaDb, metaKeyVolume(key), metaKeyLba(key), this.metaKeyBuf);
  }

  /** Whether metamap key `key` lies in a page of the tree found damaged (its cached entry is not to be trusted). */
  private metaDamaged(key: number): boolean {
    return this.damagedMeta.size > 0 && this.damagedMeta.has(key - (metaKeyLba(key) % META_SLOTS));
  }

  /** What a block reads as (through the parents of a linked volume): an id, ZERO_BLOCK, or undefined for a hole. */
  private resolveMeta(volume: number, lba: number): number | undefined {
    if (this.tree.linked(volume)) return this.tree.resolve(volume, lba);
    const id = this.lookupMeta(metaKey(volume, lba));
    return id === MASK_BLOCK ? undefined : id;
  }

  /** The blocks `volume` has entries of its own for (its metamap, not what it reads through), ascending. */
  private ownBlocks(volume: number): number[] {
    const blocks = new Set<number>();
    forEachMeta(this.metaDb, { volume, from: 0 }, (_v, lba) => blocks.add(lba));
    for (const overlay of [this.frozen, this.live]) {
      if (!overlay) continue;
      overlay.meta.forEach((v, k) => {
        if (metaKeyVolume(k) !== volume) return;
        if (v === HOLE) blocks.delete(metaKeyLba(k));
        else blocks.add(metaKeyLba(k));
      });
    }
    return [...blocks].sort((a, b) => a - b);
  }

  /**
   * The cached page holding a metamap key, loaded from the index and both overlays
   * in this tick when it is not cached; undefined only when the cache is off.
   */
  private metaPage(key: number): MetaPage | undefined {
    const pk = pageKey(key);
    const cached = this.cache.get(pk);
    if (cached || !this.cache.enabled) return cached;
    const page = new MetaPage();
    const start = pk * META_PAGE;
    const volume = metaKeyVolume(start);
    const lba = metaKeyLba(start);
    // A damaged 16-block page of the tree fails its own blocks only (metaDamaged), not the 1024.
    forEachMeta(
      this.metaDb,
      { volume, from: lba, to: lba + META_PAGE },
      (_v, l, id) => {
        page.ids[l - lba] = id;
      },
      (err) => {
        const first = metaKey(err.volume, err.first);
        if (this.damagedMeta.has(first)) return;
        this.damagedMeta.add(first);
        this.log.error(`${err.message}: its blocks fail (EIO); run fsck`);
      },
    );
    for (const overlay of [this.frozen, this.live]) {
      if (!overlay || overlay.meta.size === 0) continue;
      for (let i = 0; i < META_PAGE; i++) {
        const v = overlay.meta.get(start + i);
        if (v !== undefined) page.ids[i] = v;
      }
    }
    this.cache.add(pk, page);
    return page;
  }

  /** Where a block's record is now, with its committed reference count. Undefined once it is gone. */
  lookupData(id: number): DataEntry | undefined {
    if (this.dying.has(id)) return undefined;
    const e = this.live.newData.get(id) ?? this.frozen?.newData.get(id);
    if (e) return e;
    const b = this.dataDb.getBinaryFast(dataPageKeyInto(id, this.idKeyBuf));
    if (b === undefined) return undefined;
    let at: number;
    try {
      at = entryOffset(b, id);
    } catch (err) {
      // A damaged page: its blocks read as missing (EIO), writes store new copies, and the
      // compactor keeps their segments. The index writer leaves the page as it is (the
      // counts of its blocks leak) unless a new block is numbered into it.
      if (!this.damagedPages.has(dataPageNumber(id))) this.log.error((err as Error).message);
      this.damagedPages.add(dataPageNumber(id));
      return undefined;
    }
    if (at < 0) return undefined;
    const d = decodeDataEntryAt(b, at);
    const m = this.movedRecord(id);
    if (!m) return d;
    return {
      ...d,
      segment: m.segment,
      offset: m.offset,
      storedLength: m.storedLength ?? d.storedLength,
      flags: m.flags ?? d.flags,
    };
  }

  /**
   * Where block `id`'s record went since the last commit, if it moved: the live overlay's
   * move over the frozen one's, with the length and flags of a mend among them (a mend
   * committing while the compactor copies its new record: the copy has its length).
   */
  private movedRecord(id: number): MovedRecord | undefined {
    const frozen = this.frozen?.moved.get(id);
    const live = this.live.moved.get(id);
    return live ? keepMend(live, frozen) : frozen;
  }

  /** The stored block with this content hash, if any (checked against the datamap's full hash). */
  private lookupHash(hash: Buffer): number | undefined {
    return this.hashCandidate(hash)?.id;
  }

  /** lookupHash with the block's datamap entry, which the write path needs next. */
  private hashCandidate(hash: Buffer): { id: number; entry: DataEntry } | undefined {
    const id = this.hashIndex.get(hash);
    if (id === undefined) return undefined;
    if (this.releasing.has(id)) return undefined;
    const entry = this.lookupData(id); // undefined for a dying block
    return entry && entry.hash.equals(hash) && !this.isDamaged(id, entry) ? { id, entry } : undefined;
  }

  /**
   * Points a metamap entry somewhere new and moves the references with it.
   * Returns what it pointed at before (undefined: a hole), for undoing.
   */
  private setMeta(key: number, value: number): number | undefined {
    const old = this.lookupMeta(key);
    if (old === value) return old;
    if (this.tree.anySnapshots) this.tree.preserve(metaKeyVolume(key), metaKeyLba(key));
    if (isData(old)) {
      this.live.addRef(old, -1);
      this.volumeBlocks.add(metaKeyVolume(key), -1);
    } else if (old === ZERO_BLOCK) this.state.zeroBlocks--;
    if (isData(value)) {
      this.live.addRef(value, 1);
      this.volumeBlocks.add(metaKeyVolume(key), 1);
    } else if (value === ZERO_BLOCK) this.state.zeroBlocks++;
    this.live.meta.set(key, value);
    this.cache.set(key, value);
    if (this.digests.size) this.digests.delete(pageKey(key));
    if (this.live.size >= this.checkpointEntries) this.checkpointSoon();
    return old;
  }

  private checkpointSoon(): void {
    if (this.checkpointQueued || this.checkpointing) return;
    this.checkpointQueued = true;
    queueMicrotask(() => {
      this.checkpointQueued = false;
      if (this.live.size >= this.checkpointEntries && !this.checkpointing)
        this.flush().catch((e) => this.log.error(`checkpoint: ${e}`));
    });
  }

  /** What an undone write puts back: the mapping it replaced, unless that block has gone since. */
  private restorable(old: number | undefined): number {
    if (old === undefined) return HOLE;
    if (old === ZERO_BLOCK || this.lookupData(old)) return old;
    return HOLE;
  }

  // ---- blocks ----------------------------------------------------------------------

  /**
   * States of `count` blocks from `lba`: from the cached pages where there are
   * some, else a range scan of the index and a probe of the overlays. Pages are
   * not loaded for this: one status query over a large disk would evict the
   * pages its reads and writes use.
   */
  blockStates(volume: number, lba: number, count: number): BlockState[] {
    const states = new Array<BlockState>(count);
    for (let b = 0; b < count;) {
      const key = metaKey(volume, lba + b);
      const i = key % META_PAGE;
      const n = Math.min(count - b, META_PAGE - i);
      const page = this.tree.linked(volume) ? undefined : this.cache.get(pageKey(key));
      if (page) {
        for (let j = 0; j < n; j++) states[b + j] = stateOf(page.ids[i + j]!);
      } else {
        const ids = this.blockIds(volume, lba + b, n);
        for (let j = 0; j < n; j++) states[b + j] = stateOf(ids[j] ?? HOLE);
      }
      b += n;
    }
    return states;
  }

  /** The block's 4 KiB, or null where it reads as zeroes. EIO if its stored copy is damaged. */
  readBlock(volume: number, lba: number): Promise<Buffer | null> {
    this.foregroundOps++;
    return this.reader.readBlock(volume, lba);
  }

  /** One whole block into `into`; settles at once when its record is in the page cache. */
  readBlockInto(volume: number, lba: number, into: Buffer): Promise<void> {
    this.foregroundOps++;
    return this.reader.readBlockInto(volume, lba, into);
  }

  /** `count` whole blocks from `lba` into `into` (block-reader.ts). */
  readBlocks(volume: number, lba: number, count: number, into: Buffer): Promise<void> {
    this.foregroundOps++;
    return this.reader.readBlocks(volume, lba, count, into);
  }

  /**
   * Reads back every data block of [lba, lba + count) and checks it against its content
   * id (a scrub, as ZFS's: what the read path finds only when a client reads the block).
   * Returns the blocks whose stored bytes are damaged. Their copies leave the hash index,
   * so neither a write nor a mirrored batch counts on them again: a replica then asks for
   * the bytes when the primary sends those blocks (verify --scrub marks them for a resync).
   */
  async scrub(
    volume: number,
    lba: number,
    count: number,
    opts: { yieldToClients?: boolean; sleep?: (ms: number) => Promise<void> } = {},
  ): Promise<number[]> {
    const damaged: number[] = [];
    const scratch = sharedBufferPool.acquire(SCRUB_WINDOW * BLOCK);
    const sleep = opts.sleep ?? ((ms: number) => new Promise<void>((r) => setTimeout(r, ms)));
    try {
      for (let at = lba; at < lba + count; at += SCRUB_WINDOW) {
        const n = Math.min(SCRUB_WINDOW, lba + count - at);
        // Clients served while this window was read: the scrub then takes at most a
        // quarter of the time, as ZFS's scrub yields to other I/O.
        const ops = this.foregroundOps;
        const began = performance.now();
        const found = await this.reader.damagedBlocks(volume, at, n, scratch.subarray(0, n * BLOCK));
        if (opts.yieldToClients && this.foregroundOps !== ops)
          await sleep(SCRUB_YIELD * (performance.now() - began));
        for (const d of found) {
          damaged.push(d.lba);
          const entry = this.lookupData(d.id);
          // Released by the checkpoint running now: deleted, nothing to flag. Mended while
          // the window was read: the read was of the old record.
          if (!entry || this.releasing.has(d.id)) continue;
          if (this.movedRecord(d.id)?.storedLength !== undefined) continue;
          this.hashIndex.delete(entry.hash, d.id);
          // Flagged in the datamap at the next checkpoint: a restart's hash index leaves it out.
          this.live.damaged.add(d.id);
          this.damagedCopies.set(entry.hash.toString('hex'), d.id);
        }
      }
    } finally {
      sharedBufferPool.release(scratch);
    }
    return damaged;
  }

  /** Whether a scrub found block `id`'s stored bytes damaged (this run, or flagged before). */
  private isDamaged(id: number, entry: DataEntry): boolean {
    return (
      this.live.damaged.has(id) ||
      (this.frozen?.damaged.has(id) ?? false) ||
      (entry.flags & EntryFlag.DAMAGED) !== 0
    );
  }

  /**
   * Puts good copies (a replica's) in place of blocks a scrub found damaged. A block still
   * mapped to a copy flagged damaged, whose content id the offered bytes decode to, gets a
   * new record under the same block id at the end of the current segment, and the datamap
   * entry moves to it (as the compactor moves a record): every mapping to the block, the
   * volume's, its snapshots' and its clones', reads the good bytes, and the block is offered
   * by its content id again (unless a copy stored since took its place). If the write fails,
   * the block stays as it was, damaged. Durable (a checkpoint) before it returns the blocks
   * mended. The contents do not change, so nothing is mirrored.
   */
  async mendBlocks(volume: number, items: Array<{ lba: number; block: MirroredBlock }>): Promise<number[]> {
    const mends: Array<Promise<number[]>> = [];
    /** Blocks mapped to a copy this call mends already: reported with it. */
    const sharing = new Map<number, number[]>();
    for (const { lba, block } of items) {
      const id = this.lookupMeta(metaKey(volume, lba));
      if (id !== undefined && sharing.has(id)) {
        sharing.get(id)!.push(lba);
        continue;
      }
      const entry = id === undefined || !isData(id) ? undefined : this.lookupData(id);
      if (!this.mendable(id!, entry)) continue;
      let record: Buffer;
      try {
        const bytes = unpackPayload(block.lz4, block.payload, this.mirrorScratch);
        if (!this.hasher.matches(bytes, entry.hash)) continue;
        record = encodeRecord(id!, bytes, entry.hash);
      } catch {
        continue; // not a block at all
      }
      this.foregroundOps++;
      const lbas = [lba];
      sharing.set(id!, lbas);
      mends.push(this.mendRecord(id!, entry.hash, record).then((done) => (done ? lbas : [])));
    }
    const mended: number[] = [];
    for (const r of await Promise.allSettled(mends)) if (r.status === 'fulfilled') mended.push(...r.value);
    mended.sort((a, b) => a - b);
    if (mended.length) await this.flush();
    return mended;
  }

  /** Writes block `id`'s new record and moves its entry there (mendBlocks). False: the block went meanwhile. */
  private async mendRecord(id: number, hash: Buffer, record: Buffer): Promise<boolean> {
    this.refuseAfterFailure();
    await this.appendMove(id, record, true);
    const key = hash.toString('hex');
    if (this.damagedCopies.get(key) === id) this.damagedCopies.delete(key);
    // Released while the record was written: its move went with the block's deletion.
    if (this.lookupData(id) === undefined || this.releasing.has(id)) return false;
    this.live.damaged.delete(id);
    // Unless another copy of the content was filed since (a client's write after the scrub).
    this.hashIndex.add(hash, id);
    return true;
  }

  /**
   * Whether block `id` (its entry `entry`) is a damaged copy on disk that a mend may write
   * again: not in memory still (a write or a move in flight, or numbered since a checkpoint
   * that has not committed: not the copy the scrub read), nor being deleted.
   */
  private mendable(id: number, entry: DataEntry | undefined): entry is DataEntry {
    return (
      entry !== undefined &&
      this.isDamaged(id, entry) &&
      !this.pending.has(id) &&
      !this.live.newData.has(id) &&
      !(this.frozen?.newData.has(id) ?? false) &&
      !this.releasing.has(id)
    );
  }

  /**
   * After new records reached their segment: any whose content a damaged copy holds mends
   * that copy too, from a copy of the record under the damaged block's id.
   */
  private mendFromRecords(
    records: Buffer,
    placed: Array<{ at: number; length: number; hash: Buffer }>,
  ): void {
    if (this.damagedCopies.size === 0) return;
    // Called once a client's or a replica's records are safely written: nothing here may fail them.
    try {
      this.mendDamagedCopies(records, placed);
    } catch (err) {
      this.log.warn(`mending damaged copies from new records: ${(err as Error).message}`);
    }
  }

  private mendDamagedCopies(
    records: Buffer,
    placed: Array<{ at: number; length: number; hash: Buffer }>,
  ): void {
    for (const p of placed) {
      const key = p.hash.toString('hex');
      const id = this.damagedCopies.get(key);
      if (id === undefined) continue;
      const entry = this.lookupData(id);
      if (!entry || !this.isDamaged(id, entry)) {
        this.damagedCopies.delete(key); // gone, or mended since
        continue;
      }
      if (!this.mendable(id, entry)) continue;
      const record = Buffer.from(records.subarray(p.at, p.at + p.length));
      encodeIdInto(id, record.subarray(8, 16));
      this.mendRecord(id, p.hash, record).then(
        (done) =>
          done && this.log.info(`block ${id}: its damaged copy mended from a new record of its content`),
        (err: Error) => this.log.warn(`block ${id}: mending its damaged copy failed: ${err.message}`),
      );
    }
  }

  private volumeName(volume: number): string {
    return Object.entries(this.state.volumes).find(([, id]) => id === volume)?.[0] ?? `#${volume}`;
  }

  /** Block ids of `count` blocks from `lba` (undefined: hole) without the cache: one range scan, then the overlays. */
  private blockIds(volume: number, lba: number, count: number): Array<number | undefined> {
    const ids = new Array<number | undefined>(count);
    if (this.tree.linked(volume)) {
      for (let i = 0; i < count; i++) ids[i] = this.tree.resolve(volume, lba + i);
      return ids;
    }
    forEachMeta(this.metaDb, { volume, from: lba, to: lba + count }, (_v, l, id) => {
      ids[l - lba] = id;
    });
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

  /**
   * Looks for a stored block with `block`'s bytes, and decides within this tick, so
   * the candidate cannot be released between the compare and the link. Returns the
   * block to share, NO_MATCH (store it and index its hash), COLLISION (store it
   * unindexed: its hash belongs to other bytes), or WAIT (the compare needs the
   * candidate's in-flight write or a read from disk first: see settle()).
   * `fetched` is a candidate's record that settle() read.
   */
  private matchNow(block: Buffer, hash: Buffer, fetched?: Fetched): number {
    const found = this.hashCandidate(hash);
    if (!found) return NO_MATCH;
    const { id: candidate, entry } = found;
    if (this.pending.has(candidate)) return WAIT;
    const stored = this.blockScratch;
    try {
      let rec: Buffer;
      if (fetched?.id === candidate) rec = fetched.record;
      else {
        if (entry.storedLength > BLOCK) return WAIT; // damaged entry: the slow path says so
        rec = this.recordScratch.subarray(0, RECORD_HEADER + entry.storedLength);
        if (!this.segments.readCached(entry.segment, entry.offset, rec)) return WAIT;
      }
      unpackRecordInto(rec, candidate, stored);
    } catch (err) {
      if (!(err instanceof CorruptBlockError)) return WAIT;
      this.log.error(`stored block ${candidate} is damaged (${err.message}); storing a new copy`);
      return NO_MATCH; // the healthy new copy takes over the hash
    }
    if (stored.equals(block)) return candidate;
    if (!this.hasher.matches(stored, entry.hash)) {
      this.log.error(`stored block ${candidate} fails its hash check; storing a new copy`);
      return NO_MATCH;
    }
    this.state.collisions++;
    this.log.warn(`hash match without equal bytes for block ${candidate}; storing a separate copy`);
    return COLLISION;
  }

  /**
   * Does what made matchNow answer WAIT: waits for the candidate's in-flight write,
   * or reads its record from disk. Errors are left for the next matchNow to meet.
   */
  private async settle(hash: Buffer): Promise<Fetched | undefined> {
    const found = this.hashCandidate(hash);
    if (!found) return undefined;
    const { id: candidate, entry } = found;
    const inflight = this.pending.get(candidate);
    if (inflight) {
      await inflight.written.catch(() => undefined);
      return undefined;
    }
    if (entry.storedLength > BLOCK) return undefined;
    try {
      const record = await this.segments.read(
        entry.segment,
        entry.offset,
        RECORD_HEADER + entry.storedLength,
      );
      return { id: candidate, record };
    } catch {
      return undefined;
    }
  }

  private overFull(): boolean {
    return this.live.size >= this.overlayLimit && this.checkpointing !== null;
  }

  /**
   * Holds a write while the overlay is past its limit and a checkpoint runs: without
   * it, sustained writes outrun the disk's sync speed and the overlay (about half a KiB
   * per new block) grows without bound, as ZFS throttles writers on dirty data.
   */
  private async throttle(): Promise<void> {
    for (let i = 0; i < THROTTLE_ROUNDS && this.overFull(); i++) {
      await this.checkpointing!.catch(() => undefined);
    }
  }

  /** Stores one 4 KiB block at (volume, lba): shared if its bytes are already stored, else appended. */
  async writeBlock(volume: number, lba: number, block: Buffer, applied?: () => void): Promise<void> {
    this.foregroundOps++;
    this.refuseAfterFailure();
    if (this.overFull()) await this.throttle();
    const key = metaKey(volume, lba);
    if (isZeroBlock(block)) {
      this.setMeta(key, ZERO_BLOCK);
      applied?.();
      return;
    }
    const hash = this.hasher.hash(block);
    return this.storeBlock(key, block, hash, undefined, applied);
  }

  /** `applied` (WriteFlags.applied) is called once the block's mapping has changed. */
  private async storeBlock(
    key: number,
    block: Buffer,
    hash: Buffer,
    first?: number,
    applied?: () => void,
  ): Promise<void> {
    let match = first ?? this.matchNow(block, hash);
    for (let tries = 0; match === WAIT && tries < SETTLE_TRIES; tries++) {
      match = this.matchNow(block, hash, await this.settle(hash));
    }
    if (match > 0) {
      this.setMeta(key, match);
      applied?.();
      return;
    }
    // Still undecided after SETTLE_TRIES: a copy of its own is always correct.
    const indexed = match === NO_MATCH;
    const id = this.state.nextBlockId++;
    const buf = this.recordBuffers.pop() ?? Buffer.allocUnsafeSlow(RECORD_HEADER + BLOCK);
    const record = buf.subarray(0, encodeRecordInto(id, block, hash, buf, 0));
    const { segment, offset, written } = this.segments.append(record);
    // Back to the free list once the segment write is done with it: every reader of a
    // pending record decodes it within its tick or copies it (pendingCopy, captures).
    const release = (): void => {
      if (this.recordBuffers.length < RECORD_BUFFERS_KEPT) this.recordBuffers.push(buf);
    };
    const inFlight = this.pending.addOne(id, record, written);
    const undo: Array<{ old: number | undefined }> = [{ old: undefined }];
    this.undoable.add(undo);
    try {
      this.live.newData.set(id, {
        segment,
        offset,
        storedLength: record.length - RECORD_HEADER,
        flags: record.readUInt16BE(4),
        hash,
      });
      if (indexed) this.hashIndex.set(hash, id);
      undo[0]!.old = this.setMeta(key, id);
      this.cache.notePlace(key, id, segment, offset, record.length - RECORD_HEADER);
      applied?.();
      await written;
      this.remember(id, record);
      this.mendFromRecords(record, [{ at: 0, length: record.length, hash }]);
    } catch (err) {
      this.unstore(key, id, hash, undo[0]!.old);
      throw err;
    } finally {
      this.pending.delete(inFlight);
      this.undoable.delete(undo);
      written.then(release, release);
    }
  }

  /** Keeps a copy of a freshly written record for mirrors (recent-records.ts). */
  private remember(id: number, record: Buffer, at?: number, length?: number): void {
    // Only mirrors read them: copying every record in cost 6% of the event loop in a
    // 1M overwrite with none (a mirror started later reads older records from disk).
    if (this.mirrorsAttached > 0) this.recent.add(id, record, at, length);
  }

  /** A mirror of one of this store's volumes starts; the returned function says it stopped. */
  attachMirror(): () => void {
    this.mirrorsAttached++;
    let attached = true;
    return () => {
      if (attached) this.mirrorsAttached--;
      attached = false;
    };
  }

  /**
   * A copy of a record whose segment write is in flight, for a reader that keeps it
   * past this tick: the original lives in a pooled buffer that is reused once written.
   */
  private pendingCopy(id: number): Buffer | undefined {
    const rec = this.pending.get(id)?.record;
    return rec ? Buffer.from(rec) : undefined;
  }

  /** A new block's segment write failed: nothing may point at it, and the block's old mapping returns. */
  private unstore(key: number, id: number, hash: Buffer, old: number | undefined): void {
    if (this.lookupMeta(key) === id) this.setMeta(key, this.restorable(old));
    this.hashIndex.delete(hash, id);
  }

  /**
   * Copies a live block's record (as read from its old segment) to the end of the
   * current one; the move becomes permanent at the next checkpoint. The block id,
   * and so every metamap entry, stays the same. False when the block was left where it is.
   */
  async relocate(id: number, record: Buffer): Promise<boolean> {
    this.refuseAfterFailure();
    // Perhaps deleted by the running checkpoint: moved by a later pass if it stays.
    if (this.releasing.has(id)) return false;
    await this.appendMove(id, record, false);
    return true;
  }

  /**
   * Appends block `id`'s `record` to the current segment and moves the block's entry there
   * in the live overlay in the same tick, as every writer records a record it appends (a
   * checkpoint freezing meanwhile counts the segment live, and its sync waits for the
   * write). A mend's move carries the new record's length and flags; a plain copy keeps
   * those of a mend not yet committed. If the write fails, the move it replaced comes back.
   */
  private async appendMove(id: number, record: Buffer, mend: boolean): Promise<void> {
    const { segment, offset, written } = this.segments.append(record);
    const inFlight = this.pending.addOne(id, record, written);
    const replaced = this.live.moved.get(id);
    const move: MovedRecord = mend
      ? { segment, offset, storedLength: record.readUInt32BE(16), flags: record.readUInt16BE(4) }
      : keepMend({ segment, offset }, this.movedRecord(id));
    this.live.moved.set(id, move);
    try {
      await written;
    } catch (err) {
      // A checkpoint may have frozen the move meanwhile: it fails too (its sync waits for
      // this write) and merges its overlay back, which must not bring the move with it.
      for (const o of [this.live, this.frozen])
        if (o?.moved.get(id) === move) {
          if (replaced) o.moved.set(id, replaced);
          else o.moved.delete(id);
        }
      throw err;
    } finally {
      this.pending.delete(inFlight);
    }
  }

  // ---- layout of a volume's records: fragmentation and materialize ------------------------

  /**
   * Where a block's record is, and how long: in memory (in flight) counts as a place of
   * its own. Undefined when the block has no datamap entry.
   */
  private recordPlace(id: number): { segment: number; offset: number; end: number } | undefined {
    const e = this.lookupData(id);
    if (!e) return undefined;
    return { segment: e.segment, offset: e.offset, end: e.offset + RECORD_HEADER + e.storedLength };
  }

  /**
   * Separate reads per MiB window of `blocks` blocks from `first`: a read covers a
   * run of records lying next to each other in one segment (as readBlocks issues
   * them, at most 256 records); holes and zero blocks need none. Null for a window
   * without data.
   */
  private windowReads(volume: number, first: number, blocks: number): number | null {
    const ids = this.blockIds(volume, first, blocks);
    let reads = 0;
    let inRun = 0;
    let prev: { segment: number; offset: number; end: number } | undefined;
    for (const id of ids) {
      if (!isData(id)) continue;
      const p = this.recordPlace(id);
      if (!p) continue;
      const follows =
        prev && p.segment === prev.segment && (p.offset === prev.end || p.offset === prev.offset);
      if (follows && inRun < 256) inRun++;
      else {
        reads++;
        inRun = 1;
      }
      prev = p;
    }
    return reads === 0 ? null : reads;
  }

  /**
   * The volume's fragmentation: the expected number of separate segment reads per
   * MiB of a cold sequential read of its data (1 is ideal: each MiB one read),
   * sampled over at most `sample` MiB windows spread evenly across the volume.
   */
  fragmentation(volume: number, blocks: number, sample = 256): { readsPerMiB: number; sampledMiB: number } {
    const windows = Math.ceil(blocks / 256);
    const step = Math.max(1, windows / sample);
    let reads = 0;
    let withData = 0;
    for (let w = 0; w < windows; w += step) {
      const first = Math.floor(w) * 256;
      const r = this.windowReads(volume, first, Math.min(256, blocks - first));
      if (r === null) continue;
      reads += r;
      withData++;
    }
    return { readsPerMiB: withData ? reads / withData : 0, sampledMiB: withData };
  }

  /**
   * Rewrites `volume`'s records in block order, a MiB window at a time, so a cold
   * sequential read issues one read per MiB. Records move (same block, new place;
   * shared blocks keep being shared), and the old copies become garbage for the
   * compactor. Windows already read in at most `keepReads` reads stay as they are.
   * Returns what moved.
   */
  async materialize(
    volume: number,
    blocks: number,
    keepReads = 2,
  ): Promise<{ movedBlocks: number; movedBytes: number }> {
    let movedBlocks = 0;
    let movedBytes = 0;
    const moved = new Set<number>();
    for (let first = 0; first < blocks; first += 256) {
      const n = Math.min(256, blocks - first);
      const reads = this.windowReads(volume, first, n);
      if (reads === null || reads <= keepReads) continue;
      const records: Array<{ id: number; record: Buffer }> = [];
      for (const id of this.blockIds(volume, first, n)) {
        if (!isData(id) || moved.has(id) || this.pending.has(id)) continue;
        const e = this.lookupData(id);
        if (!e) continue;
        let record: Buffer;
        try {
          record = await this.segments.read(e.segment, e.offset, RECORD_HEADER + e.storedLength);
          // Checked before it moves: a damaged record is left where it is, for reads to report.
          decodeRecordInto(record, id, e.hash, this.hasher, this.mirrorScratch);
        } catch {
          continue;
        }
        records.push({ id, record });
        moved.add(id);
      }
      // Appended within one tick, so the window's records lie next to each other.
      const writes: Promise<void>[] = [];
      for (const { id, record } of records) {
        // Skip a block the compactor or a release took away while this window was read.
        const now = this.lookupData(id);
        if (!now || this.pending.has(id)) continue;
        writes.push(
          this.relocate(id, record).then((moved) => {
            if (!moved) return;
            movedBlocks++;
            movedBytes += record.length;
          }),
        );
      }
      await settleAll(writes);
      await this.throttle();
    }
    await this.flush();
    return { movedBlocks, movedBytes };
  }

  /** Bytes of live records per segment, as of the last checkpoint. */
  segmentLiveBytes(segment: number): number {
    return this.state.segmentLive[segment] ?? 0;
  }

  /**
   * Stores whole blocks at lba.. from `data` (a multiple of 4 KiB). New blocks are
   * encoded into one buffer and appended with one write; zero blocks, repeats within
   * the request and hash hits (compared byte for byte) are linked instead. Blocks
   * whose compare must wait take the single-block path.
   */
  async writeBlocks(volume: number, lba: number, data: Buffer, applied?: () => void): Promise<void> {
    this.foregroundOps++;
    this.refuseAfterFailure();
    if (this.overFull()) await this.throttle();
    const count = data.length / BLOCK;
    if (!this.pool || count < this.poolMinBlocks) return this.storeBatch(volume, lba, data, null, applied);
    const batch = await this.pool.encode(data);
    try {
      await this.storeBatch(volume, lba, data, batch, applied);
    } finally {
      this.pool.release(batch);
    }
  }

  /** writeBlocks' work, with hashes and lz4 output from the pool when `batch` is given. */
  private async storeBatch(
    volume: number,
    lba: number,
    data: Buffer,
    batch: BatchView | null,
    applied: (() => void) | undefined,
  ): Promise<void> {
    const count = data.length / BLOCK;
    // Pooled: a fresh MiB costs page faults on every request. Only the segment write
    // and the pending map use it, and both are done with it when this call returns.
    const slab = sharedBufferPool.acquire(count * (RECORD_HEADER + BLOCK));
    const use: SlabUse = { written: null };
    try {
      await this.storeInto(slab, use, volume, lba, data, batch, applied);
    } finally {
      // Whatever went wrong, the slab goes back only once no write reads from it.
      if (use.written) await use.written.catch(() => undefined);
      sharedBufferPool.release(slab);
    }
  }

  private async storeInto(
    slab: Buffer,
    use: SlabUse,
    volume: number,
    lba: number,
    data: Buffer,
    batch: BatchView | null,
    applied: (() => void) | undefined,
  ): Promise<void> {
    const count = data.length / BLOCK;
    let used = 0;
    const fresh: Fresh[] = [];
    const repeats: Repeat[] = [];
    // Fresh blocks of this request by hash prefix, for repeats within it (the loop
    // never awaits, so one table serves every request).
    const local = this.requestHashes;
    local.clear();
    const later: Promise<void>[] = [];
    // Zero blocks and hash hits, mapped with the new blocks once their records are encoded:
    // a request's mappings change in one tick (a verify's digests never see half of one).
    const linked: Array<{ old: number | undefined; key: number; id: number }> = [];
    // One native call for the request's hashes: a call per block cost more than the hashing.
    let hashes: Buffer | null = null;
    if (!batch) this.hasher.hashBlocks(data, (hashes = Buffer.allocUnsafe(count * 16)));
    for (let i = 0; i < count; i++) {
      const block = data.subarray(i * BLOCK, (i + 1) * BLOCK);
      const key = metaKey(volume, lba + i);
      if (batch ? batch.lengths[i] === PACKED_ZERO : isZeroBlock(block)) {
        linked.push({ old: undefined, key, id: ZERO_BLOCK });
        continue;
      }
      // Copied out of the slab: hashes outlive the batch in the overlay.
      const hash = batch ? Buffer.from(batch.hash(i)) : hashes!.subarray(16 * i, 16 * i + 16);
      const prefix = hash.readUIntLE(0, 6);
      const seen = local.get(prefix);
      const earlier = seen === undefined ? undefined : fresh[seen];
      let match: number;
      if (earlier && earlier.hash.equals(hash)) {
        if (data.subarray(earlier.index * BLOCK, (earlier.index + 1) * BLOCK).equals(block)) {
          repeats.push({ key, of: earlier, old: undefined });
          continue;
        }
        // A hash shared with an earlier, different block of this request: stored apart.
        this.state.collisions++;
        match = COLLISION;
      } else {
        match = this.matchNow(block, hash);
      }
      if (match === WAIT) {
        // Told WAIT, storeBlock settles first: nothing it does before its first await
        // may number a block, or this request's fresh ids would not be consecutive.
        later.push(this.storeBlock(key, block, hash, WAIT));
        continue;
      }
      if (match > 0) {
        // Kept from dying (as an undoable mapping's old block is) until it is linked below.
        linked.push({ old: match, key, id: match });
        continue;
      }
      const id = this.state.nextBlockId++;
      const packed = batch?.lengths[i];
      // Without a batch, records are encoded once the loop knows how many are new.
      const length =
        packed === undefined
          ? 0
          : packed === PACKED_RAW
            ? writeRecordInto(id, hash, block, false, slab, used)
            : writeRecordInto(id, hash, batch!.slot(i).subarray(0, packed), true, slab, used);
      const f: Fresh = {
        key,
        index: i,
        id,
        at: used,
        length,
        hash,
        indexed: match === NO_MATCH,
        old: undefined,
      };
      used += length;
      if (!earlier) local.set(prefix, fresh.length);
      fresh.push(f);
    }
    // Observed from here on: one failing while the new records are written must not go
    // unhandled (Node ends the process on an unhandled rejection).
    const waited = Promise.allSettled(later);
    this.undoable.add(linked);
    try {
      if (hashes && fresh.length) {
        const encoded = this.encodeFresh(data, hashes, fresh, slab);
        used = typeof encoded === 'number' ? encoded : await encoded;
      }
    } catch (err) {
      this.undoable.delete(linked);
      await waited;
      throw err;
    }
    this.undoable.delete(linked);
    for (const l of linked) this.setMeta(l.key, l.id);
    // Blocks still deciding (`later`) change their mappings after some wait: the request's
    // mapping is whole only at completion, so `applied` is left uncalled.
    const early = later.length === 0 ? applied : undefined;
    // Whatever fails here (segments.append opens a new file, and can throw), the blocks
    // still being stored in `later` read this request's payload: they finish first.
    try {
      if (fresh.length) await this.storeFresh(slab.subarray(0, used), use, fresh, repeats, early);
      else early?.();
    } catch (err) {
      await waited;
      throw err;
    }
    for (const o of await waited) if (o.status === 'rejected') throw o.reason;
  }

  /**
   * Encodes storeInto's new records one after another into `slab`, on the libuv pool
   * when there are enough of them to pay for the hand-off; returns the bytes used, at
   * once when encoded here (no turn of the event loop in between). Their mappings
   * change only after this: until then nothing can find the new ids.
   */
  private encodeFresh(data: Buffer, hashes: Buffer, fresh: Fresh[], slab: Buffer): number | Promise<number> {
    let used = 0;
    if (fresh.length < POOL_ENCODE_MIN) {
      for (const f of fresh) {
        const block = data.subarray(f.index * BLOCK, (f.index + 1) * BLOCK);
        f.at = used;
        f.length = encodeRecordInto(f.id, block, f.hash, slab, used);
        used += f.length;
      }
      return used;
    }
    const items = new Float64Array(2 * fresh.length);
    for (let k = 0; k < fresh.length; k++) {
      items[2 * k] = fresh[k]!.index;
      items[2 * k + 1] = fresh[k]!.id;
    }
    const lengths = new Int32Array(fresh.length);
    return native.encodeRecords(data, items, hashes, slab, lengths).then(() => {
      for (let k = 0; k < fresh.length; k++) {
        const f = fresh[k]!;
        f.at = used;
        f.length = lengths[k]!;
        used += f.length;
      }
      return used;
    });
  }

  /** storeInto's new records: one segment write, then their mappings; undone if it fails. */
  private async storeFresh(
    records: Buffer,
    use: SlabUse,
    fresh: Fresh[],
    repeats: Repeat[],
    applied: (() => void) | undefined,
  ): Promise<void> {
    const { segment, offset, written } = this.segments.append(records);
    use.written = written;
    const starts = new Uint32Array(fresh.length + 1);
    for (let k = 0; k < fresh.length; k++) {
      // One synchronous pass numbered them: consecutive ids, as PendingRecords needs.
      if (fresh[k]!.id !== fresh[0]!.id + k) throw new Error('fresh block ids are not consecutive');
      starts[k + 1] = fresh[k]!.at + fresh[k]!.length;
    }
    const inFlight = this.pending.add(fresh[0]!.id, records, starts, written);
    this.undoable.add(fresh);
    this.undoable.add(repeats);
    try {
      for (const f of fresh) {
        this.live.newData.set(f.id, {
          segment,
          offset: offset + f.at,
          storedLength: f.length - RECORD_HEADER,
          flags: records.readUInt16BE(f.at + 4),
          hash: f.hash,
        });
        if (f.indexed) this.hashIndex.set(f.hash, f.id);
        f.old = this.setMeta(f.key, f.id);
        // Its first read then needs no datamap lookup (random reads of freshly written data
        // spent a tenth of their time in LMDB's B-tree for it).
        this.cache.notePlace(f.key, f.id, segment, offset + f.at, f.length - RECORD_HEADER);
      }
      for (const r of repeats) r.old = this.setMeta(r.key, r.of.id);
      applied?.();
      await written;
      // Copied from the slab in place: a view per block was an allocation per block.
      for (const f of fresh) this.remember(f.id, records, f.at, f.length);
      this.mendFromRecords(records, fresh);
    } catch (err) {
      for (const f of fresh) this.unstore(f.key, f.id, f.hash, f.old);
      for (const r of repeats)
        if (this.lookupMeta(r.key) === r.of.id) this.setMeta(r.key, this.restorable(r.old));
      throw err;
    } finally {
      this.pending.delete(inFlight);
      this.undoable.delete(fresh);
      this.undoable.delete(repeats);
    }
  }

  /**
   * Once an fdatasync has failed (segments.ts, syncFailure), or the index could not say
   * whether a commit landed (indexFailure), nothing new can become durable: changes are
   * refused with EIO rather than acknowledged and lost.
   */
  private refuseAfterFailure(): void {
    const failed = this.segments.failed ?? this.indexFailure;
    if (failed) throw failed;
  }

  /** Makes the block a hole (never written) or a zero block. */
  discardBlock(volume: number, lba: number, asZero: boolean): void {
    this.refuseAfterFailure();
    this.setMeta(metaKey(volume, lba), asZero ? ZERO_BLOCK : (this.tree.entryFor(volume, undefined) ?? HOLE));
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
    if (this.indexFailure) throw this.indexFailure;
    const frozenAt = performance.now();
    // Every record in a segment sealed by now is in this overlay or an earlier one.
    const sealedBefore = this.segments.currentSegment;
    const frozen = this.live;
    this.frozen = frozen;
    this.live = this.spare;
    const seq = (this.state.commitSeq ?? 0) + 1;
    const token = crypto.randomBytes(8).toString('hex');
    let reply: CheckpointReply | null = null;
    let gone: Array<{ id: number; hash: Buffer }> = [];
    try {
      gone = this.markDying(frozen);
      // Taken at the freeze: the counters go on moving with the live overlay.
      const owned = this.ownedState(seq, token);
      const syncing = performance.now();
      await this.segments.sync();
      const committing = performance.now();
      reply = await this.writer.commit(this.tables.encode(frozen, this.dying, this.releasing, owned));
      this.log.debug(
        `checkpoint: ${frozen.size} changes; segments synced in ${(committing - syncing).toFixed(1)} ms, ` +
          `committed in ${(performance.now() - committing).toFixed(1)} ms`,
      );
    } catch (err) {
      // A writer that died (or whose answer went astray) after its commit landed: the
      // changes are in the index, and folding them back would apply them twice.
      reply = this.landedCommit(seq, token, err);
      if (!reply) {
        // Nothing was lost from memory: fold the frozen changes back under the live ones.
        this.merge(frozen);
        this.frozen = null;
        this.dying.clear();
        this.releasing.clear();
        throw this.indexFailure ?? err;
      }
      this.log.warn(`checkpoint ${seq}: the index writer failed after its commit landed (${err}); kept`);
    }
    // Committed: from here on, nothing may fold the frozen changes back in.
    this.durableAsOf = frozenAt;
    this.state.commitSeq = seq;
    try {
      this.adoptCommit(reply, gone);
    } finally {
      this.frozen = null;
      this.dying.clear();
      this.releasing.clear();
      frozen.clear();
      this.spare = frozen;
    }
    this.retireDeadSegments(sealedBefore);
  }

  /**
   * Removes the sealed segments nothing points at any more, at the commit that left
   * them empty rather than at the compactor's next pass: removed, a segment becomes a
   * spare, and a rewrite's appends go over the pages of the data it replaced. Only
   * segments sealed before this checkpoint's freeze: all their records were in its
   * overlay or an earlier one, so their committed live bytes are all there is.
   */
  private retireDeadSegments(sealedBefore: number): void {
    const now = performance.now();
    const sealed = this.segments.sealed();
    // Segments the compactor removed meanwhile are no longer waited for.
    for (const n of this.emptySince.keys()) if (!sealed.includes(n)) this.emptySince.delete(n);
    for (const n of sealed) {
      if (n >= sealedBefore || this.segmentLiveBytes(n) > 0) {
        this.emptySince.delete(n);
        continue;
      }
      // A mirror reads blocks it captured when the replica asks for them, a round trip
      // later; a block that died meanwhile is still read from here for a while, rather
      // than its chunk sent again over a new link.
      const since = this.emptySince.get(n);
      if (since === undefined) this.emptySince.set(n, now);
      if (since === undefined || now - since < this.emptySegmentGraceMs) continue;
      this.emptySince.delete(n);
      this.segments
        .remove(n)
        .catch((err: unknown) => this.log.warn(`removing empty segment ${n}: ${(err as Error).message}`));
    }
  }

  /**
   * From the freeze on, nothing may link to a block the writer could delete: blocks it
   * left at zero that the frozen epoch did not touch, and blocks born and released in
   * it, except those a failing write may still put back. Blocks the epoch takes
   * references from go in `releasing` (the writer deletes those it leaves at zero).
   * Returns the hashes to unfile once they are deleted: those born in the epoch, from
   * the overlay (the writer reports the rest as it deletes them).
   */
  private markDying(frozen: Overlay): Array<{ id: number; hash: Buffer }> {
    const dying = this.dying;
    this.zeroRef.forEach((_v, id) => {
      if (!frozen.refDelta.has(id) && !frozen.moved.has(id)) dying.set(id, 1);
    });
    for (const id of frozen.newData.idList()) if ((frozen.refDelta.get(id) ?? 0) <= 0) dying.set(id, 1);
    const releasing = this.releasing;
    frozen.refDelta.forEach((d, id) => {
      if (d < 0 && !frozen.newData.has(id)) releasing.set(id, 1);
    });
    for (const items of this.undoable)
      for (const { old } of items)
        if (old !== undefined) {
          dying.delete(old);
          releasing.delete(old);
        }
    const gone: Array<{ id: number; hash: Buffer }> = [];
    dying.forEach((_v, id) => {
      const hash = frozen.newData.hash(id);
      if (hash) gone.push({ id, hash });
    });
    return gone;
  }

  /**
   * What the index says of checkpoint `seq` (attempt `token`) when its writer failed
   * (`why`): null if it did not land; if it did, the writer's answer rebuilt from what it
   * committed. The blocks it deleted are the dying ones the datamap no longer holds.
   * Null too when the index cannot be read, and the store then takes no more changes.
   */
  private landedCommit(seq: number, token: string, why: unknown): CheckpointReply | null {
    let s: StoreState | undefined;
    try {
      this.env.resetReadTxn();
      s = this.stateDb.get('store') as StoreState | undefined;
    } catch (err) {
      this.indexFailure = new BlockError(
        'EIO',
        `checkpoint ${seq} failed (${(why as Error)?.message ?? why}) and the index cannot say whether it ` +
          `landed (${(err as Error).message}); this store takes no more changes until the gateway restarts`,
      );
      this.log.error(this.indexFailure.message);
      return null;
    }
    if (s?.commitSeq !== seq || s.commitToken !== token) return null;
    const key = Buffer.allocUnsafe(8);
    const deleted = new NumMap();
    const check = (_v: number, id: number): void => {
      const page = this.dataDb.getBinaryFast(dataPageKeyInto(id, key));
      if (!page || entryOffset(page, id) < 0) deleted.set(id, 1);
    };
    this.dying.forEach(check);
    this.releasing.forEach(check);
    // Their hashes came only with the lost answer: found by id instead.
    this.hashIndex.deleteIds(deleted);
    return {
      counters: { uniqueBlocks: s.uniqueBlocks, storedBytes: s.storedBytes, segmentLive: s.segmentLive },
      zeroRef: Float64Array.from(s.zeroRef ?? []),
      gone: { ids: new Float64Array(0), hashes: new Uint8Array(0) },
      missing: [],
      damagedPages: [],
    };
  }

  /** The per-volume data block counts as the state record keeps them (no zero entries). */
  private volumeBlocksRecord(): Record<string, number> {
    const out: Record<string, number> = {};
    this.volumeBlocks.forEach((n, v) => {
      if (n !== 0) out[v] = n;
    });
    return out;
  }

  /** The state the checkpoint records beside the tables; the writer owns the counters it changes (blocks, bytes, segments). */
  private ownedState(commitSeq: number, commitToken: string): string {
    const s = this.state;
    return JSON.stringify({
      commitSeq,
      commitToken,
      version: s.version,
      secret: s.secret,
      nextBlockId: s.nextBlockId,
      nextVolumeId: s.nextVolumeId,
      volumes: s.volumes,
      mappedBlocks: this.mappedBlocks(),
      zeroBlocks: s.zeroBlocks,
      collisions: s.collisions,
      volumeBlocks: this.volumeBlocksRecord(),
      tree: this.tree.toJSON(),
    });
  }

  /** Takes the writer's counters and zero set, and unfiles the blocks it deleted. */
  private adoptCommit(reply: CheckpointReply, gone: Array<{ id: number; hash: Buffer }>): void {
    if (reply.missing.length) {
      this.log.error(`checkpoint: references to missing blocks ${reply.missing.slice(0, 10).join(', ')}`);
    }
    for (const n of reply.damagedPages) {
      if (this.leakingPages.has(n)) continue;
      this.leakingPages.add(n);
      this.log.error(
        `datamap page ${n} is damaged: the reference counts of its blocks are no longer kept ` +
          `(their space is not reclaimed); run fsck`,
      );
    }
    this.state.uniqueBlocks = reply.counters.uniqueBlocks;
    this.state.storedBytes = reply.counters.storedBytes;
    this.state.segmentLive = reply.counters.segmentLive;
    this.zeroRef.clear();
    for (const id of reply.zeroRef) this.zeroRef.set(id, 1);
    for (const g of gone) this.hashIndex.delete(g.hash, g.id);
    const hashes = Buffer.from(
      reply.gone.hashes.buffer,
      reply.gone.hashes.byteOffset,
      reply.gone.hashes.length,
    );
    // Read here, before the next request: the writer reuses this memory for its next reply.
    reply.gone.ids.forEach((id, k) =>
      this.hashIndex.deleteKey(hashes.readUInt32LE(16 * k), hashes.readUInt32LE(16 * k + 4), id),
    );
    // Reads on this thread now see the writer's commit.
    this.env.resetReadTxn();
    this.trimIndexMapping();
  }

  /**
   * Copy-on-write moves the index's trees to new pages at every commit, and each
   * page a read ever touched stays in the process's RSS: it grew to the size of
   * the file (300 MiB for 70 MiB of trees after 2 GiB written). Dropping the
   * mapping's pages after a commit keeps RSS to what the next interval touches;
   * the pages stay in the page cache.
   */
  private trimIndexMapping(): void {
    try {
      native.dropFileMappings(this.indexFile);
    } catch (err) {
      this.log.debug(`trimming the index mapping: ${(err as Error).message}`);
    }
  }

  private merge(frozen: Overlay): void {
    const live = this.live;
    this.live = frozen;
    live.meta.forEach((v, k) => frozen.meta.set(k, v));
    live.newData.forEach((id, e) => frozen.newData.set(id, e));
    live.refDelta.forEach((d, id) => frozen.addRef(id, d));
    for (const [id, m] of live.moved) frozen.moved.set(id, keepMend(m, frozen.moved.get(id)));
    for (const id of live.damaged) frozen.damaged.add(id);
    live.clear();
    this.spare = live;
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
    const mappedBlocks = this.mappedBlocks();
    const logicalBytes = mappedBlocks * BLOCK;
    return {
      mappedBlocks,
      zeroBlocks: s.zeroBlocks,
      uniqueBlocks: s.uniqueBlocks,
      logicalBytes,
      uniqueBytes,
      storedBytes: s.storedBytes,
      segmentBytes,
      reclaimableBytes: Math.max(0, segmentBytes - s.storedBytes),
      spareBytes: this.segments.spareBytes(),
      dedupRatio: uniqueBytes ? logicalBytes / uniqueBytes : 1,
      compressionRatio: s.storedBytes ? uniqueBytes / s.storedBytes : 1,
      collisions: s.collisions,
      indexBytes,
      indexFileBytes,
      indexBytesPerBlock: s.uniqueBlocks ? Math.round(indexBytes / s.uniqueBlocks) : 0,
      hashIndexBytes: this.hashIndex.bytes,
    };
  }

  /**
   * Makes volume `dst` (empty) map every block `src` maps, raising reference counts: a
   * copy in metadata only, no data read or written. A chunk per tick; `src` must not
   * change meanwhile (demote copies a volume nobody writes).
   */
  async copyVolume(src: number, dst: number, blocks: number): Promise<void> {
    const CHUNK = 4096;
    for (let first = 0; first < blocks; first += CHUNK) {
      const end = Math.min(blocks, first + CHUNK);
      for (let lba = first; lba < end; lba++) {
        const id = this.resolveMeta(src, lba);
        if (id !== undefined) this.setMeta(metaKey(dst, lba), id);
      }
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
    await this.flush();
  }

  // ---- snapshots and clones -------------------------------------------------------------

  /**
   * Makes `name` a point-in-time view of `origin`'s first `blocks` blocks, in this
   * tick and without copying its metamap (see volume-tree.ts). The caller holds the
   * origin's writes while this runs and flushes after.
   */
  snapshotVolume(origin: number, name: string, blocks: number): number {
    if (this.state.volumes[name] !== undefined) throw new TreeError(`the store already has a volume ${name}`);
    const id = this.volumeId(name);
    this.tree.snapshot(origin, id, blocks);
    return id;
  }

  /** Makes `name` a writable volume reading through to snapshot `base` below `blocks`, in this tick. */
  cloneVolume(base: number, name: string, blocks: number): number {
    if (this.state.volumes[name] !== undefined) throw new TreeError(`the store already has a volume ${name}`);
    const id = this.volumeId(name);
    try {
      this.tree.clone(base, id, blocks);
    } catch (err) {
      delete this.state.volumes[name];
      throw err;
    }
    return id;
  }

  /** Volumes that read through `volume` (its clones; for an origin, its snapshots), by name. */
  dependents(volume: number): string[] {
    return this.tree.dependents(volume).map((id) => this.volumeName(id));
  }

  /**
   * Makes `origin` read as its snapshot `snap` again, its first `blocks` blocks (the
   * caller has truncated it to that). Newer snapshots keep their views. Visits only
   * the blocks changed since the snapshot, all in one overlay so no checkpoint holds
   * half of it.
   */
  rollbackVolume(origin: number, snap: number): number {
    if (this.tree.link(snap)?.kind !== 'snapshot' || this.tree.originOf(snap) !== origin)
      throw new TreeError(`volume #${snap} is not a snapshot of #${origin}`);
    let changed = 0;
    for (const lba of this.tree.changedSince(snap, origin)) {
      const want = this.tree.resolve(snap, lba);
      if (this.resolveMeta(origin, lba) === want) continue;
      this.setMeta(metaKey(origin, lba), this.tree.entryFor(origin, want) ?? HOLE);
      changed++;
    }
    return changed;
  }

  /**
   * Blocks whose contents differ between snapshot `older` (of `olderBlocks` blocks)
   * and `newer`, a later snapshot of the same origin or the origin itself, ascending,
   * each with whether it reads as zeroes in `newer`. Costs in proportion to the
   * blocks changed in between (and to any growth), not to the volume.
   */
  changedBlocks(
    older: number,
    olderBlocks: number,
    newer: number,
    newerBlocks: number,
  ): Array<{ lba: number; zero: boolean }> {
    const out: Array<{ lba: number; zero: boolean }> = [];
    const reads = (id: number | undefined): number => (id === undefined ? ZERO_BLOCK : id);
    const limit = Math.min(olderBlocks, newerBlocks);
    for (const lba of this.tree.changedSince(older, newer)) {
      if (lba >= limit) break;
      const now = reads(this.resolveMeta(newer, lba));
      if (reads(this.resolveMeta(older, lba)) !== now) out.push({ lba, zero: now === ZERO_BLOCK });
    }
    // Past the smaller size: what the larger one holds there differs from nothing.
    const [bigger, from, to] =
      newerBlocks > olderBlocks ? [newer, olderBlocks, newerBlocks] : [older, newerBlocks, olderBlocks];
    for (let lba = from; lba < to; lba++) {
      const id = this.resolveMeta(bigger, lba);
      if (id !== undefined && id !== ZERO_BLOCK) out.push({ lba, zero: bigger === older });
    }
    return out;
  }

  /** True when snapshot `a` was taken before `b` (a later snapshot of one origin, or that origin). */
  isOlder(a: number, b: number): boolean {
    return this.tree.isOlder(a, b);
  }

  /**
   * Digests (SHA-256 of block kinds and content ids) of a volume's chunks of 1024
   * blocks, 32 bytes each: what verify compares. Cached per chunk and dropped by
   * any change to the chunk's mapping, so a check costs what changed since the last.
   * Chunks `first` to `first + count` (clipped to the volume), all by default.
   */
  chunkDigests(volume: number, blocks: number, first = 0, count = Infinity): Buffer {
    const end = Math.min(Math.ceil(blocks / META_PAGE), first + count);
    const out = Buffer.allocUnsafe(Math.max(0, end - first) * 32);
    for (let c = first; c < end; c++) {
      const lba = c * META_PAGE;
      const pk = pageKey(metaKey(volume, lba));
      const n = Math.min(META_PAGE, blocks - lba);
      let d = this.digests.get(pk);
      if (!d || d.count !== n) {
        const r = this.captureRange(volume, lba, n);
        d = { count: n, digest: crypto.createHash('sha256').update(r.kinds).update(r.cids).digest() };
        // Only chunks holding data are kept: a thin volume is mostly chunks without, cheap to
        // capture again, and an entry for each would cost a 10 TiB volume's verify ~2.5M.
        if (r.cids.length > 0) this.digests.set(pk, d);
      }
      d.digest.copy(out, (c - first) * 32);
    }
    return out;
  }

  // ---- mirroring -------------------------------------------------------------------

  /** Names this store's content-id key without revealing it: equal only for stores of one cluster. */
  contentDomain(): Buffer {
    return contentDomain(Buffer.from(this.state.secret, 'base64'));
  }

  /**
   * The state of `count` blocks from `lba`, taken in this tick (so it is one the
   * volume really had), with where each data block's bytes are.
   */
  captureRange(volume: number, lba: number, count: number): CapturedRange {
    const kinds = Buffer.alloc(count);
    const cids: Buffer[] = [];
    const sources: BlockSource[] = [];
    // Records still in memory are views at first (of pooled slabs and a ring that are
    // reused, while the capture lives until the replica has acknowledged it), copied out
    // below into one buffer. A Buffer each cost more than the copying (Node's pool hands
    // out 8 KiB at a time: an ArrayBuffer every third record of a 1 MiB write).
    let heldBytes = 0;
    for (let b = 0; b < count; b++) {
      const id = this.resolveMeta(volume, lba + b);
      if (id === undefined) continue; // a hole: KIND_HOLE, already 0
      if (id === ZERO_BLOCK) {
        kinds[b] = KIND_ZERO;
        continue;
      }
      const entry = this.lookupData(id);
      if (!entry) throw new CorruptBlockError(`block ${id} has no datamap entry`);
      kinds[b] = KIND_DATA;
      cids.push(entry.hash);
      const record = this.pending.get(id)?.record ?? this.recent.view(id);
      if (record) heldBytes += record.length;
      sources.push({
        id,
        hash: entry.hash,
        segment: entry.segment,
        offset: entry.offset,
        storedLength: entry.storedLength,
        record,
      });
    }
    if (heldBytes) {
      const copies = Buffer.allocUnsafe(heldBytes);
      let at = 0;
      for (const src of sources) {
        if (!src.record) continue;
        const length = src.record.copy(copies, at);
        src.record = copies.subarray(at, at + length);
        at += length;
      }
    }
    return { lba, kinds, cids: Buffer.concat(cids), sources };
  }

  /**
   * A captured block's stored payload (lz4 or raw), checked against its hash first when
   * it comes from disk, so a damaged copy is never sent. Records never change in place; a record compacted
   * away since the capture is an error the mirror answers with a resync.
   */
  async sourcePayload(src: BlockSource): Promise<{ lz4: boolean; payload: Buffer }> {
    let rec = src.record;
    if (!rec) {
      // From disk: checked first. A record still in memory was encoded from the client's
      // bytes moments ago, and checking it again would only double the cost.
      try {
        rec = await this.segments.read(src.segment, src.offset, RECORD_HEADER + src.storedLength);
      } catch (err) {
        // The compactor may have moved the block (same id) and deleted the old segment.
        const now = this.lookupData(src.id);
        if (!now || (now.segment === src.segment && now.offset === src.offset)) throw err;
        rec =
          this.pendingCopy(src.id) ??
          (await this.segments.read(now.segment, now.offset, RECORD_HEADER + now.storedLength));
      }
      decodeRecordInto(rec, src.id, src.hash, this.hasher, this.mirrorScratch);
    }
    return recordPayload(rec);
  }

  /** Ordinals of the data blocks among `ranges` (content ids of this store's domain) it holds no copy of. */
  missingContent(ranges: Array<{ cids: Buffer }>, owner?: object): number[] {
    const missing: number[] = [];
    let ordinal = 0;
    for (const r of ranges) {
      for (let at = 0; at < r.cids.length; at += 16, ordinal++) {
        const have = this.lookupHash(r.cids.subarray(at, at + 16));
        if (have === undefined || this.unsettledBlock(have, owner)) missing.push(ordinal);
      }
    }
    return missing;
  }

  /**
   * Applies a mirrored batch in one tick, so neither a reader nor a checkpoint (and so
   * neither a crash) ever sees part of it. `blocks` holds the bytes sent for the
   * ordinals the replica lacked, decoded and checked against their content ids here
   * (CorruptBlockError for a payload that fails either). Returns the
   * ordinals still missing (a block released since the replica said it had it: ask
   * again, nothing applied), or the completion of the new blocks' segment write.
   */
  applyMirrored(
    volume: number,
    ranges: Array<{ lba: number; kinds: Buffer; cids: Buffer }>,
    blocks: Map<number, MirroredBlock>,
    /** Who applies the batch (a replica link): see unsettledBlock. */
    owner?: object,
  ): { missing: number[] } | { written: Promise<void> } {
    this.foregroundOps++;
    this.refuseAfterFailure();
    const ids: number[] = [];
    const missing: number[] = [];
    /** New blocks, with the ordinals that carry them (a batch may repeat one). */
    const fresh: FreshMirrored[] = [];
    // Indexes into `fresh` by hash prefix, as storeInto's (this never awaits either): a
    // string key per block cost an allocation each and fed the scavenger.
    const local = this.requestHashes;
    local.clear();
    let ordinal = 0;
    for (const r of ranges) {
      for (let at = 0; at < r.cids.length; at += 16, ordinal++) {
        const cid = r.cids.subarray(at, at + 16);
        let have = this.lookupHash(cid);
        if (have !== undefined && this.unsettledBlock(have, owner)) have = undefined;
        ids.push(have ?? -1);
        if (have !== undefined) continue;
        const prefix = cid.readUIntLE(0, 6);
        const seen = local.get(prefix);
        const known =
          seen === undefined
            ? undefined
            : fresh[seen]!.hash.equals(cid)
              ? fresh[seen]
              : fresh.find((f) => f.hash.equals(cid)); // two content ids, one prefix: rare
        const block = blocks.get(ordinal);
        if (known) known.ordinals.push(ordinal);
        else if (block) {
          // Decoded into one scratch block and dropped: only its hash is needed, and a
          // batch's worth of decoded blocks (1 MiB) was written and read back cold.
          let decoded: Buffer;
          try {
            decoded = unpackPayload(block.lz4, block.payload, this.mirrorScratch);
          } catch (err) {
            throw new CorruptBlockError(`mirrored block ${ordinal}: ${(err as Error).message}`);
          }
          if (!this.hasher.matches(decoded, cid))
            throw new CorruptBlockError(`mirrored block ${ordinal} does not match its content id`);
          if (seen === undefined) local.set(prefix, fresh.length);
          fresh.push({ block, hash: Buffer.from(cid), ordinals: [ordinal] });
        } else missing.push(ordinal);
      }
    }
    if (missing.length) return { missing };
    return { written: this.applyMirroredNow(volume, ranges, ids, fresh, owner ?? {}) };
  }

  /**
   * A new block whose segment write is in flight, stored by a client's write or by
   * another owner's mirrored batch. If that write fails, its own mappings are undone
   * but not this batch's link, and the replica would hold a damaged block it has
   * acknowledged: the batch takes its own copy instead. A block an earlier batch of the
   * same owner (replica link) stored may be linked: its failure fails that link, and
   * the primary sends the ranges of every batch not yet durable again.
   */
  private unsettledBlock(id: number, owner: object | undefined): boolean {
    if (!this.pending.has(id) || (owner !== undefined && this.mirrorPlaced.get(id) === owner)) return false;
    return this.live.newData.has(id) || (this.frozen?.newData.has(id) ?? false);
  }

  /** applyMirrored's changes, all in one overlay: the new blocks, then every mapping. */
  private applyMirroredNow(
    volume: number,
    ranges: Array<{ lba: number; kinds: Buffer; cids: Buffer }>,
    ids: number[],
    fresh: FreshMirrored[],
    owner: object,
  ): Promise<void> {
    let written: Promise<void> = RESOLVED;
    const placedIds = new Set<number>();
    if (fresh.length) {
      // Pooled, as storeBatch's: a fresh MiB per batch cost page faults, and V8 counts
      // external memory towards its next full mark. Released once the write settles.
      const slab = sharedBufferPool.acquire(fresh.length * (RECORD_HEADER + BLOCK));
      let used = 0;
      const placed: Array<{ id: number; at: number; length: number; hash: Buffer }> = [];
      for (const f of fresh) {
        const id = this.state.nextBlockId++;
        // Stored as it came: the payload was checked (decoded and hashed) above.
        const length = writeRecordInto(id, f.hash, f.block.payload, f.block.lz4, slab, used);
        placed.push({ id, at: used, length, hash: f.hash });
        for (const o of f.ordinals) ids[o] = id;
        placedIds.add(id);
        used += length;
      }
      const records = slab.subarray(0, used);
      const appended = this.segments.append(records);
      const starts = Uint32Array.from([...placed.map((p) => p.at), used]);
      const inFlight = this.pending.add(placed[0]!.id, records, starts, appended.written);
      const forget = (): void => {
        this.pending.delete(inFlight);
        for (const p of placed) this.mirrorPlaced.delete(p.id);
        sharedBufferPool.release(slab);
      };
      written = appended.written.then(
        () => {
          this.mendFromRecords(records, placed); // copies what it needs before the slab goes
          forget();
        },
        (err: unknown) => {
          forget();
          // Nothing may point at bytes that never reached the disk: every mapping to them
          // becomes a hole (this batch's, and later batches' of the same link, which linked
          // to them: all in the overlays, as the blocks are new), and the primary, told of
          // the failure, sends the volume again.
          const keys: number[] = [];
          for (const o of [this.frozen, this.live])
            o?.meta.forEach((id, key) => {
              if (placedIds.has(id)) keys.push(key);
            });
          for (const key of keys) if (placedIds.has(this.lookupMeta(key) ?? HOLE)) this.setMeta(key, HOLE);
          for (const p of placed) this.hashIndex.delete(p.hash, p.id);
          throw err;
        },
      );
      // Settling is arranged before anything below can throw: an error there must not
      // leave the records registered as in flight (and the slab unreleased) for good.
      try {
        for (const p of placed) {
          this.live.newData.set(p.id, {
            segment: appended.segment,
            offset: appended.offset + p.at,
            storedLength: p.length - RECORD_HEADER,
            flags: records.readUInt16BE(p.at + 4),
            hash: p.hash,
          });
          // A copy taken beside another's block in flight (unsettledBlock) leaves that one
          // filed: replacing it would send others that count on it to ask for the bytes.
          const filed = this.hashIndex.get(p.hash);
          if (filed === undefined || this.releasing.has(filed) || !this.lookupData(filed))
            this.hashIndex.set(p.hash, p.id);
          this.mirrorPlaced.set(p.id, owner);
        }
      } catch (err) {
        // The caller gets this error, not the write's: its failure is handled above.
        written.catch(() => undefined);
        throw err;
      }
    }
    let ordinal = 0;
    for (const r of ranges) {
      for (let b = 0; b < r.kinds.length; b++) {
        const key = metaKey(volume, r.lba + b);
        const kind = r.kinds[b];
        if (kind === KIND_DATA) this.setMeta(key, ids[ordinal++]!);
        else this.setMeta(key, kind === KIND_ZERO ? ZERO_BLOCK : HOLE);
      }
    }
    return written;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    try {
      await this.flush(true);
    } catch (err) {
      // A store that can no longer commit still closes: it reopens at its last checkpoint.
      if (!this.segments.failed && !this.indexFailure) throw err;
      this.log.error(`closing without a final checkpoint: ${(err as Error).message}`);
    }
    this.closed = true;
    clearInterval(this.timer);
    await this.writer.close();
    await this.pool?.close();
    await this.env.close();
    await this.segments.settleEarlySync();
    this.segments.close();
  }
}
