// A frozen overlay as one transferable buffer, for the index-writer worker.
// Serialising is the only checkpoint work left on the event loop.

import { Overlay } from './overlay';

export interface CheckpointCounters {
  uniqueBlocks: number;
  storedBytes: number;
  segmentLive: Record<string, number>;
}

export interface CheckpointRequest {
  /** Float64 pairs: metaKey, value (block id, ZERO_BLOCK or HOLE). */
  meta: Float64Array;
  /** Float64 pairs: block id, reference delta. */
  refDelta: Float64Array;
  /** Float64 triples: block id, new segment, new offset. */
  moved: Float64Array;
  /** Block ids to delete if their count is still zero after this checkpoint's deltas. */
  dying: Float64Array;
  /** NEW_DATA_BYTES per new block, see encodeCheckpoint. */
  newData: Buffer;
  /** The store state to persist (JSON), counters as of the previous checkpoint. */
  state: string;
}

export interface CheckpointReply {
  counters: CheckpointCounters;
  /** Blocks whose count reached zero and were kept: candidates for the next checkpoint. */
  zeroRef: number[];
  /** Blocks referenced by the index that the datamap lacks: a bug if ever non-empty. */
  missing: number[];
}

/** id f64, segment u32, offset u32, storedLength u32, flags u16, pad 2, hash 16. */
export const NEW_DATA_BYTES = 40;

export function encodeCheckpoint(o: Overlay, dying: number[], state: string): CheckpointRequest {
  const meta = new Float64Array(o.meta.size * 2);
  let i = 0;
  for (const [k, v] of o.meta) {
    meta[i++] = k;
    meta[i++] = v;
  }
  const refDelta = new Float64Array(o.refDelta.size * 2);
  i = 0;
  for (const [id, d] of o.refDelta) {
    refDelta[i++] = id;
    refDelta[i++] = d;
  }
  const moved = new Float64Array(o.moved.size * 3);
  i = 0;
  for (const [id, m] of o.moved) {
    moved[i++] = id;
    moved[i++] = m.segment;
    moved[i++] = m.offset;
  }
  const newData = Buffer.alloc(o.newData.size * NEW_DATA_BYTES);
  let at = 0;
  for (const [id, e] of o.newData) {
    newData.writeDoubleBE(id, at);
    newData.writeUInt32BE(e.segment, at + 8);
    newData.writeUInt32BE(e.offset, at + 12);
    newData.writeUInt32BE(e.storedLength, at + 16);
    newData.writeUInt16BE(e.flags, at + 20);
    e.hash.copy(newData, at + 24);
    at += NEW_DATA_BYTES;
  }
  return { meta, refDelta, moved, dying: Float64Array.from(dying), newData, state };
}

/** The buffers to transfer rather than copy. */
export function transferList(r: CheckpointRequest): ArrayBuffer[] {
  return [r.meta.buffer, r.refDelta.buffer, r.moved.buffer, r.dying.buffer] as ArrayBuffer[];
}
