// The index writer: a worker thread that owns every write transaction of
// the dedup store's LMDB index. A checkpoint's changes (often hundreds of
// thousands of puts) are applied here, so the event loop that serves NBD
// clients never stalls on them. Reads stay on the main thread (LMDB readers
// never wait for the writer).

import { parentPort, workerData } from 'node:worker_threads';
import { CheckpointReply, CheckpointRequest, NEW_DATA_BYTES } from './checkpoint-message';
import {
  DataEntry,
  RECORD_HEADER,
  decodeDataEntry,
  encodeDataEntry,
  encodeId,
  encodeMetaKey,
  metaKeyLba,
  metaKeyVolume,
} from './layout';
import { openIndex } from './index-db';
import { HOLE } from './overlay';

const { dir } = workerData as { dir: string };
const { env, meta: metaDb, data: dataDb, state: stateDb } = openIndex(dir);

/** What this worker owns in the store state; the rest comes from the main thread. */
interface WriterState {
  uniqueBlocks: number;
  storedBytes: number;
  segmentLive: Record<string, number>;
  /** Blocks kept at reference count zero: deleted once a checkpoint finds them untouched. */
  zeroRef: number[];
}

function apply(req: CheckpointRequest): CheckpointReply {
  const committed = stateDb.get('store') as Partial<WriterState> | undefined;
  const state: WriterState = {
    uniqueBlocks: committed?.uniqueBlocks ?? 0,
    storedBytes: committed?.storedBytes ?? 0,
    segmentLive: { ...(committed?.segmentLive ?? {}) },
    zeroRef: [],
  };
  const zero = new Set<number>(committed?.zeroRef ?? []);
  const missing: number[] = [];
  const live = (segment: number, delta: number): void => {
    const v = (state.segmentLive[segment] ?? 0) + delta;
    if (v > 0) state.segmentLive[segment] = v;
    else delete state.segmentLive[segment];
  };

  for (let i = 0; i < req.meta.length; i += 2) {
    const k = req.meta[i]!;
    const key = encodeMetaKey(metaKeyVolume(k), metaKeyLba(k));
    if (req.meta[i + 1] === HOLE) metaDb.remove(key);
    else metaDb.put(key, encodeId(req.meta[i + 1]!));
  }

  const fresh = new Map<number, { entry: DataEntry }>();
  // Structured clone delivers a plain Uint8Array.
  const b = Buffer.from(req.newData.buffer, req.newData.byteOffset, req.newData.byteLength);
  for (let at = 0; at < b.length; at += NEW_DATA_BYTES) {
    fresh.set(b.readDoubleBE(at), {
      entry: {
        segment: b.readUInt32BE(at + 8),
        offset: b.readUInt32BE(at + 12),
        storedLength: b.readUInt32BE(at + 16),
        flags: b.readUInt16BE(at + 20),
        refcount: 0,
        hash: Buffer.from(b.subarray(at + 24, at + 40)),
      },
    });
  }
  const delta = new Map<number, number>();
  for (let i = 0; i < req.refDelta.length; i += 2) delta.set(req.refDelta[i]!, req.refDelta[i + 1]!);
  const moved = new Map<number, { segment: number; offset: number }>();
  for (let i = 0; i < req.moved.length; i += 3) {
    moved.set(req.moved[i]!, { segment: req.moved[i + 1]!, offset: req.moved[i + 2]! });
  }
  const dying = new Set(req.dying);

  const touched = new Set<number>([...fresh.keys(), ...delta.keys(), ...moved.keys(), ...dying]);
  for (const id of touched) {
    const f = fresh.get(id);
    let e = f?.entry;
    if (!e) {
      const b = dataDb.getBinary(encodeId(id));
      if (!b) {
        if (!dying.has(id)) missing.push(id);
        continue;
      }
      e = decodeDataEntry(b);
    }
    const bytes = RECORD_HEADER + e.storedLength;
    const refcount = e.refcount + (delta.get(id) ?? 0);
    if (refcount <= 0 && f) continue; // born and released between two checkpoints: never indexed
    if (refcount <= 0 && dying.has(id)) {
      // Marked dying at the freeze, so nothing can have linked to it since.
      dataDb.remove(encodeId(id));
      state.uniqueBlocks--;
      state.storedBytes -= bytes;
      live(e.segment, -bytes);
      zero.delete(id);
      continue;
    }
    if (refcount <= 0) zero.add(id);
    else zero.delete(id);
    if (f) {
      state.uniqueBlocks++;
      state.storedBytes += bytes;
      live(e.segment, bytes);
    }
    const move = moved.get(id);
    if (move && !f) {
      live(e.segment, -bytes);
      live(move.segment, bytes);
      e = { ...e, segment: move.segment, offset: move.offset };
    }
    dataDb.put(encodeId(id), encodeDataEntry({ ...e, refcount: Math.max(refcount, 0) }));
  }
  state.zeroRef = [...zero];
  stateDb.put('store', { ...(JSON.parse(req.state) as object), ...state });
  return {
    counters: {
      uniqueBlocks: state.uniqueBlocks,
      storedBytes: state.storedBytes,
      segmentLive: state.segmentLive,
    },
    zeroRef: state.zeroRef,
    missing,
  };
}

parentPort!.on('message', (msg: { seq: number; req: CheckpointRequest }) => {
  try {
    // Committed and flushed to disk before transactionSync returns.
    const reply = env.transactionSync(() => apply(msg.req));
    parentPort!.postMessage({ seq: msg.seq, reply });
  } catch (err) {
    parentPort!.postMessage({ seq: msg.seq, error: (err as Error).message });
  }
});
