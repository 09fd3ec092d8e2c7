// A frozen overlay as tables in shared memory, for the index-writer worker.
// Serialising is the only checkpoint work left on the event loop.
//
// The tables live in SharedArrayBuffers the main thread keeps and reuses: one
// checkpoint runs at a time, and a fresh buffer per checkpoint would cost page
// faults for every MiB of it. Every block id the checkpoint touches gets one row
// saying all the writer needs to know about it, so the writer joins nothing.

import { NumMap } from './num-map';
import { Overlay } from './overlay';

export interface CheckpointCounters {
  uniqueBlocks: number;
  storedBytes: number;
  segmentLive: Record<string, number>;
}

/** Row kinds (bits). */
export const ROW_FRESH = 1;
/** Delete the block if its count is zero after this checkpoint's deltas (nothing can link to it meanwhile). */
export const ROW_DYING = 2;
export const ROW_MOVED = 4;
/** Flag the block's entry EntryFlag.DAMAGED. */
export const ROW_DAMAGED = 8;
/** With ROW_MOVED: the record is a new one (a mend), its stored length and flags in the length and flags slots. */
export const ROW_MENDED = 16;

/**
 * Float64 slots per id row: id, delta, kind, segment, offset, length, flags, moved segment,
 * moved offset, pad, hash (16 bytes). Length and flags are a fresh block's, or a mended one's
 * new record's (never both: a block is mended only once its first checkpoint has begun).
 */
export const ROW_SLOTS = 12;
export const ROW_HASH_BYTE = 80;

export interface CheckpointRequest {
  /** Float64 pairs: metaKey, value (block id, ZERO_BLOCK or HOLE); metaCount of them. */
  meta: Float64Array;
  metaCount: number;
  /** ROW_SLOTS per touched block id; rowCount of them. */
  rows: Float64Array;
  rowCount: number;
  /** The store state to persist (JSON), counters as of the previous checkpoint. */
  state: string;
}

export interface CheckpointReply {
  counters: CheckpointCounters;
  /** Blocks whose count reached zero and were kept: candidates for the next checkpoint. */
  zeroRef: Float64Array;
  /** Blocks the commit deleted from the datamap, and their hashes (16 bytes each, in order). */
  gone: { ids: Float64Array; hashes: Uint8Array };
  /** Blocks referenced by the index that the datamap lacks: a bug if ever non-empty. */
  missing: number[];
  /** Datamap pages found damaged: changes to their blocks' counts were dropped (index-writer-worker.ts). */
  damagedPages: number[];
}

function sharedFloats(n: number): Float64Array {
  return new Float64Array(new SharedArrayBuffer(n * 8));
}

/** The main thread's reusable request tables. */
export class CheckpointTables {
  private meta = sharedFloats(2 * 4096);
  private rows = sharedFloats(ROW_SLOTS * 4096);

  /**
   * Fills the tables from a frozen overlay; valid until the next call. The writer may
   * delete the `dying` blocks and the `releasing` ones (see DedupStore) at count zero.
   */
  encode(o: Overlay, dying: NumMap, releasing: NumMap, state: string): CheckpointRequest {
    const metaCount = o.meta.size;
    if (this.meta.length < metaCount * 2) this.meta = sharedFloats(2 * grown(metaCount));
    const meta = this.meta;
    let i = 0;
    o.meta.forEach((v, k) => {
      meta[i++] = k;
      meta[i++] = v;
    });

    // At most one row per id in any of the five sets.
    const bound = o.newData.size + o.refDelta.size + o.moved.size + dying.size + o.damaged.size;
    if (this.rows.length < bound * ROW_SLOTS) this.rows = sharedFloats(ROW_SLOTS * grown(bound));
    const rows = this.rows;
    const words = new Uint32Array(rows.buffer);
    let n = 0;
    const moves = o.moved.size > 0;
    const scrubbed = o.damaged.size > 0;
    const row = (id: number): number => {
      const at = n++ * ROW_SLOTS;
      const m = moves ? o.moved.get(id) : undefined;
      rows[at] = id;
      rows[at + 1] = o.refDelta.get(id) ?? 0;
      rows[at + 2] =
        (dying.has(id) || releasing.has(id) ? ROW_DYING : 0) |
        (m ? ROW_MOVED : 0) |
        (m?.storedLength !== undefined ? ROW_MENDED : 0) |
        (scrubbed && o.damaged.has(id) ? ROW_DAMAGED : 0);
      rows[at + 7] = m?.segment ?? 0;
      rows[at + 8] = m?.offset ?? 0;
      if (m?.storedLength !== undefined) {
        rows[at + 5] = m.storedLength;
        rows[at + 6] = m.flags ?? 0;
      }
      return at;
    };
    // Straight from the new-block table's columns: an entry object and a hash view per
    // block made this loop most of the event loop's stall at a checkpoint's freeze.
    const c = o.newData.columns();
    for (let r = 0; r < c.n; r++) {
      const at = row(c.ids[r]!);
      rows[at + 2] = rows[at + 2]! | ROW_FRESH;
      rows[at + 3] = c.segment[r]!;
      rows[at + 4] = c.offset[r]!;
      rows[at + 5] = c.length[r]!;
      rows[at + 6] = c.flags[r]!;
      const w = at * 2 + ROW_HASH_BYTE / 4;
      words[w] = c.hashWords[r * 4]!;
      words[w + 1] = c.hashWords[r * 4 + 1]!;
      words[w + 2] = c.hashWords[r * 4 + 2]!;
      words[w + 3] = c.hashWords[r * 4 + 3]!;
    }
    o.refDelta.forEach((_d, id) => {
      if (!o.newData.has(id)) row(id);
    });
    for (const id of o.moved.keys()) if (!o.newData.has(id) && !o.refDelta.has(id)) row(id);
    const rowed = (id: number): boolean => o.newData.has(id) || o.refDelta.has(id) || o.moved.has(id);
    dying.forEach((_v, id) => {
      if (!rowed(id)) row(id);
    });
    for (const id of o.damaged) if (!rowed(id) && !dying.has(id)) row(id);
    return { meta, metaCount, rows, rowCount: n, state };
  }
}

/** Room for n entries with some to spare, so the tables settle after a few checkpoints. */
function grown(n: number): number {
  return Math.max(4096, Math.ceil(n * 1.5));
}
