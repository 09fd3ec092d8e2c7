// The index writer: a worker thread that owns every write transaction of
// the dedup store's LMDB index. A checkpoint's changes (often hundreds of
// thousands of puts) are applied here, so the event loop that serves NBD
// clients never stalls on them. Reads stay on the main thread (LMDB readers
// never wait for the writer).

import { parentPort, workerData } from 'node:worker_threads';
import {
  CheckpointReply,
  CheckpointRequest,
  ROW_DAMAGED,
  ROW_DYING,
  ROW_FRESH,
  ROW_MENDED,
  ROW_HASH_BYTE,
  ROW_MOVED,
  ROW_SLOTS,
} from './checkpoint-message';
import { EntryFlag, RECORD_HEADER, encodeIdInto, metaKeyLba, metaKeyVolume } from './layout';
import { openIndex } from './index-db';
import { HOLE } from './overlay';
import {
  DataPageError,
  readPageInto,
  dataPageNumber,
  emptyPage,
  entryOffset,
  isEmptyPage,
  setPresent,
} from './data-pages';
import { META_PAGE_BYTES, META_SLOTS, isEmptyMetaPage, metaPageKeyInto, setSlot } from './meta-pages';
import { NumMap } from './num-map';
import { native } from '../../native-bindings';

// Commits are throughput work: woken by a checkpoint, this thread should not take the
// CPU from the event loop that posted it (native-bindings, throughputThread).
native.throughputThread();

const { dir } = workerData as { dir: string };
const { env, meta, data, state: stateDb } = openIndex(dir);
// Made by the store's own open, which converts older stores before it starts this worker.
const metaDb = meta!;
const dataDb = data!;

/** What this worker owns in the store state; the rest comes from the main thread. */
interface WriterState {
  uniqueBlocks: number;
  storedBytes: number;
  segmentLive: Record<string, number>;
  /** Blocks kept at reference count zero: deleted once a checkpoint finds them untouched. */
  zeroRef: number[];
  /** Checkpoints committed so far: a request must carry the next number. */
  commitSeq: number;
}

/**
 * The committed counters and zero-count set, kept between checkpoints rather than
 * parsed back every time; dropped when a commit fails, so the next one starts from
 * what the index really holds.
 */
let committed: { state: WriterState; zero: NumMap } | null = null;

function loadCommitted(): { state: WriterState; zero: NumMap } {
  const c = stateDb.get('store') as Partial<WriterState> | undefined;
  const zero = new NumMap();
  for (const id of c?.zeroRef ?? []) zero.set(id, 1);
  return {
    state: {
      uniqueBlocks: c?.uniqueBlocks ?? 0,
      storedBytes: c?.storedBytes ?? 0,
      segmentLive: { ...(c?.segmentLive ?? {}) },
      zeroRef: [],
      commitSeq: c?.commitSeq ?? 0,
    },
    zero,
  };
}

/** The datamap pages a commit changes, by page number: loaded once, put once. */
const touched = new Map<number, Buffer>();
/**
 * Page buffers kept from one commit to the next: a checkpoint of random overwrites
 * touches tens of thousands of pages, and a new buffer for each was tens of MB of
 * garbage a commit in this worker's heap.
 */
const freePages: Buffer[] = [];
const KEEP_FREE_PAGES = 16384;

/**
 * Pages this commit found damaged (not a page's length, say). Nothing can be read from
 * one, so the changes to its blocks' counts are dropped (their space leaks, and fsck
 * names the page) rather than failing every commit from then on: one bad value would
 * otherwise stop the store taking durable writes at all. A new block numbered into one
 * (the newest page) starts it over empty: its unreadable entries were lost already.
 */
const damaged = new Set<number>();

/** The page holding `id`, loaded once per commit; null for a damaged one unless `fresh`. */
function pageFor(id: number, fresh = false): Buffer | null {
  const n = dataPageNumber(id);
  if (damaged.has(n) && !fresh) return null;
  let page = touched.get(n);
  if (!page) {
    page = freePages.pop() ?? emptyPage();
    const stored = dataDb.getBinaryFast(encodeIdInto(n, idBuf));
    if (!stored) page.fill(0);
    else {
      try {
        readPageInto(stored, n, page);
      } catch (err) {
        if (!(err instanceof DataPageError)) throw err;
        damaged.add(n);
        if (!fresh) {
          freePages.push(page);
          return null;
        }
        page.fill(0);
      }
    }
    touched.set(n, page);
  }
  return page;
}

/** Gives a commit's page buffers back for the next one. */
function releasePages(): void {
  for (const page of touched.values()) if (freePages.length < KEEP_FREE_PAGES) freePages.push(page);
  touched.clear();
}

// Key and value buffers reused for every put: LMDB copies them at the call.
const keyBuf = Buffer.allocUnsafe(12);
const idBuf = Buffer.allocUnsafe(8);
const entryBuf = Buffer.allocUnsafe(36);

/**
 * The blocks a commit deleted and their hashes, for the reply: shared memory kept
 * across commits (the main thread reads them before it sends the next request). Fresh
 * arrays per commit were new pages every time, and a Buffer per deleted hash.
 */
let goneIds = new Float64Array(new SharedArrayBuffer(8 * 4096));
let goneHashes = Buffer.from(new SharedArrayBuffer(16 * 4096));
let goneCount = 0;

/** Files block `id`, whose hash is entryBuf[20, 36), as deleted by this commit. */
function noteGone(id: number): void {
  if (goneCount === goneIds.length) {
    const ids = new Float64Array(new SharedArrayBuffer(16 * goneIds.length));
    ids.set(goneIds);
    const hashes = Buffer.from(new SharedArrayBuffer(2 * goneHashes.length));
    goneHashes.copy(hashes);
    goneIds = ids;
    goneHashes = hashes;
  }
  goneIds[goneCount] = id;
  copy16(entryBuf, 20, goneHashes, 16 * goneCount);
  goneCount++;
}

/**
 * 16 bytes from `src` at `from` to `dst` at `to`: Buffer.copy makes a view per call, and
 * read/writeUInt32LE's argument checks cost twice what this loop does.
 */
function copy16(src: Buffer, from: number, dst: Buffer, to: number): void {
  for (let k = 0; k < 16; k++) dst[to + k] = src[from + k]!;
}

/** The metamap pages a commit changes, by their first block's metaKey: loaded once, put once. */
const touchedMeta = new Map<number, Buffer>();
const freeMetaPages: Buffer[] = [];

/**
 * The overlay's metamap changes, a page at a time (meta-pages.ts). The store sends no change
 * for a block of a page whose stored value is not one (its length is wrong: writes to its
 * blocks fail); were one sent, the page would start over as holes.
 */
function applyMeta(meta: Float64Array, count: number): void {
  for (const page of touchedMeta.values())
    if (freeMetaPages.length < KEEP_FREE_PAGES) freeMetaPages.push(page);
  touchedMeta.clear();
  for (let i = 0; i < count * 2; i += 2) {
    const k = meta[i]!;
    const slot = metaKeyLba(k) % META_SLOTS;
    const first = k - slot;
    let page = touchedMeta.get(first);
    if (!page) {
      page = freeMetaPages.pop() ?? Buffer.allocUnsafe(META_PAGE_BYTES);
      const stored = metaDb.getBinaryFast(metaPageKeyInto(metaKeyVolume(first), metaKeyLba(first), keyBuf));
      // lmdb-js's buffer is longer than the value; only its `length` says how long the value is.
      if (stored?.length === META_PAGE_BYTES)
        page.set(new Uint8Array(stored.buffer, stored.byteOffset, META_PAGE_BYTES));
      else page.fill(0xff);
      touchedMeta.set(first, page);
    }
    const v = meta[i + 1]!;
    setSlot(page, slot, v === HOLE ? undefined : v);
  }
  // In key order: neighbouring puts then share B-tree pages.
  for (const first of [...touchedMeta.keys()].sort((a, b) => a - b)) {
    const page = touchedMeta.get(first)!;
    const key = metaPageKeyInto(metaKeyVolume(first), metaKeyLba(first), keyBuf);
    if (isEmptyMetaPage(page)) metaDb.remove(key);
    else metaDb.put(key, page);
  }
}

function apply(req: CheckpointRequest): CheckpointReply {
  committed ??= loadCommitted();
  const { zero } = committed;
  const recorded = JSON.parse(req.state) as { commitSeq: number };
  // The deltas are relative: a checkpoint applied twice (its commit landed, its reply
  // did not reach the store, which then retried it) would count every change twice.
  if (recorded.commitSeq !== committed.state.commitSeq + 1) {
    throw new Error(
      `checkpoint ${recorded.commitSeq} is out of order: the index holds checkpoint ${committed.state.commitSeq}`,
    );
  }
  // Counters are changed on a copy: the transaction may still fail.
  const state: WriterState = { ...committed.state, segmentLive: { ...committed.state.segmentLive } };
  const missing: number[] = [];
  // Blocks this commit deletes, with their hashes: the main thread unfiles them from its
  // hash index afterwards (it used to read each one's entry back itself, on the event loop).
  goneCount = 0;
  const live = (segment: number, delta: number): void => {
    const v = (state.segmentLive[segment] ?? 0) + delta;
    if (v > 0) state.segmentLive[segment] = v;
    else delete state.segmentLive[segment];
  };

  applyMeta(req.meta, req.metaCount);

  const rows = req.rows;
  const bytes = Buffer.from(rows.buffer, rows.byteOffset, rows.byteLength);
  // Pages are loaded on first touch and written once, after the rows: consecutive ids share
  // one (data-pages.ts), and a run of fresh or freed blocks is a put per page.
  releasePages(); // left by a commit that failed
  damaged.clear();
  for (let r = 0; r < req.rowCount; r++) {
    const at = r * ROW_SLOTS;
    const id = rows[at]!;
    const kind = rows[at + 2]!;
    const fresh = (kind & ROW_FRESH) !== 0;
    const dying = (kind & ROW_DYING) !== 0;
    let page: Buffer | undefined;
    let slot = -1;
    let segment: number;
    let offset: number;
    let storedLength: number;
    let flags: number;
    let refcount: number;
    if (fresh) {
      segment = rows[at + 3]!;
      offset = rows[at + 4]!;
      storedLength = rows[at + 5]!;
      flags = rows[at + 6]!;
      refcount = 0;
      copy16(bytes, at * 8 + ROW_HASH_BYTE, entryBuf, 20);
    } else {
      const p = pageFor(id);
      if (!p) continue; // damaged: this block's count is no longer kept
      page = p;
      slot = entryOffset(page, id);
      if (slot < 0) {
        if (!dying) missing.push(id);
        continue;
      }
      segment = page.readUInt32BE(slot);
      offset = page.readUInt32BE(slot + 4);
      storedLength = page.readUInt32BE(slot + 8);
      flags = page.readUInt16BE(slot + 12);
      refcount = page.readUInt32BE(slot + 16);
      copy16(page, slot + 20, entryBuf, 20);
    }
    let stored = RECORD_HEADER + storedLength;
    refcount += rows[at + 1]!;
    // Born and released between two checkpoints: never indexed. A fresh block left at zero
    // but not dying is one a failed write may still put back: indexed, and kept at zero.
    if (refcount <= 0 && fresh && dying) continue;
    if (refcount <= 0 && dying) {
      // Marked dying at the freeze, so nothing can have linked to it since.
      setPresent(page!, id, false);
      noteGone(id);
      state.uniqueBlocks--;
      state.storedBytes -= stored;
      live(segment, -stored);
      zero.delete(id);
      continue;
    }
    if (refcount <= 0) zero.set(id, 1);
    else zero.delete(id);
    if (fresh) {
      state.uniqueBlocks++;
      state.storedBytes += stored;
      live(segment, stored);
    }
    if ((kind & ROW_MOVED) !== 0 && !fresh) {
      live(segment, -stored);
      segment = rows[at + 7]!;
      offset = rows[at + 8]!;
      if ((kind & ROW_MENDED) !== 0) {
        // A new record in place of a damaged one: its own length, and flags without DAMAGED.
        state.storedBytes -= stored;
        storedLength = rows[at + 5]!;
        flags = rows[at + 6]!;
        stored = RECORD_HEADER + storedLength;
        state.storedBytes += stored;
      }
      live(segment, stored);
    }
    // A mend in the same overlay came after the scrub's flag (a scrub flags no copy mended
    // since the overlay began; a failed checkpoint's merge brings the two together).
    if ((kind & ROW_DAMAGED) !== 0 && (kind & ROW_MENDED) === 0) flags |= EntryFlag.DAMAGED;
    page ??= pageFor(id, true)!;
    slot = setPresent(page, id, true);
    page.writeUInt32BE(segment, slot);
    page.writeUInt32BE(offset, slot + 4);
    page.writeUInt32BE(storedLength, slot + 8);
    page.writeUInt16BE(flags, slot + 12);
    page.writeUInt16BE(0, slot + 14);
    page.writeUInt32BE(Math.max(refcount, 0), slot + 16);
    copy16(entryBuf, 20, page, slot + 20);
  }
  // In key order: neighbouring puts then share B-tree pages.
  for (const n of [...touched.keys()].sort((a, b) => a - b)) {
    const page = touched.get(n)!;
    const key = encodeIdInto(n, idBuf);
    if (isEmptyPage(page)) dataDb.remove(key);
    else dataDb.put(key, page);
  }
  releasePages();
  const zeroRef = new Float64Array(zero.size);
  let z = 0;
  zero.forEach((_v, id) => (zeroRef[z++] = id));
  state.zeroRef = Array.from(zeroRef);
  state.commitSeq = recorded.commitSeq;
  stateDb.put('store', { ...recorded, ...state });
  committed.state = state;
  return {
    counters: {
      uniqueBlocks: state.uniqueBlocks,
      storedBytes: state.storedBytes,
      segmentLive: state.segmentLive,
    },
    zeroRef,
    gone: { ids: goneIds.subarray(0, goneCount), hashes: goneHashes.subarray(0, 16 * goneCount) },
    missing,
    damagedPages: [...damaged],
  };
}

parentPort!.on('message', (msg: { seq: number; req: CheckpointRequest }) => {
  try {
    // Committed and flushed to disk before transactionSync returns.
    const reply = env.transactionSync(() => apply(msg.req));
    parentPort!.postMessage({ seq: msg.seq, reply }, [reply.zeroRef.buffer as ArrayBuffer]);
  } catch (err) {
    // The zero-count set may hold this failed transaction's changes.
    committed = null;
    parentPort!.postMessage({ seq: msg.seq, error: (err as Error).message });
  }
});
