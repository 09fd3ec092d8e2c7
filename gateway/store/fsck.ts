// Offline consistency check of a dedup store (`blockgate fsck --data DIR`):
// every metamap entry resolves, every reference count equals the references
// to it, every stored block's bytes hash as recorded, and the counters add
// up (the hash index lives in memory, rebuilt from the datamap at open). Orphaned segment space is
// reported but is not an inconsistency (it is what a crash leaves behind).

import fs from 'node:fs';
import path from 'node:path';
import type { TreeState } from './volume-tree';
import { openIndex } from './index-db';
import { dataEntries } from './data-pages';
import { forEachMeta } from './meta-pages';
import { isSpareFile } from './segments';
import { BlockHasher, CorruptBlockError, decodeRecord } from './block-codec';
import {
  BLOCK,
  RECORD_HEADER,
  MASK_BLOCK,
  ZERO_BLOCK,
  decodeDataEntry,
  decodeId,
  decodeMetaKey,
  segmentFileName,
} from './layout';

export interface FsckReport {
  volumes: number;
  metaEntries: number;
  zeroBlocks: number;
  dataBlocks: number;
  segmentBytes: number;
  liveBytes: number;
  orphanedBytes: number;
  /** Files of removed segments kept to be written over as new ones (segments.ts): no data. */
  spareBytes: number;
  problems: string[];
}

/** At most this many problems are listed one by one; the count is always exact. */
const MAX_LISTED = 50;

export function fsckStore(storeDir: string): FsckReport {
  const { env, meta, legacyMeta, data, legacyData, state: stateDb } = openIndex(storeDir, { readOnly: true });
  const problems: string[] = [];
  let problemCount = 0;
  const problem = (p: string): void => {
    problemCount++;
    if (problems.length < MAX_LISTED) problems.push(p);
  };
  try {
    const state = stateDb.get('store') as
      | {
          secret: string;
          volumes: Record<string, number>;
          uniqueBlocks: number;
          mappedBlocks: number;
          zeroBlocks: number;
          nextBlockId: number;
          segmentLive?: Record<string, number>;
          zeroRef?: number[];
          tree?: TreeState;
          volumeBlocks?: Record<string, number>;
        }
      | undefined;
    if (!state) throw new Error(`${storeDir} holds no dedup store`);
    const hasher = new BlockHasher(Buffer.from(state.secret, 'base64'));
    const volumeIds = new Set(Object.values(state.volumes));
    for (const [id, link] of Object.entries(state.tree?.links ?? {})) {
      if (!volumeIds.has(Number(id))) problem(`snapshot/clone link of unknown volume #${id}`);
      if (!volumeIds.has(link.parent)) problem(`volume #${id} reads through missing volume #${link.parent}`);
    }
    const zeroRef = new Set(state.zeroRef ?? []);

    const refs = new Map<number, number>();
    let metaEntries = 0;
    let zeroBlocks = 0;
    let masks = 0;
    const perVolume = new Map<number, number>(); // volume -> blocks mapped to data
    const entry = (volume: number, lba: number, id: number): void => {
      metaEntries++;
      if (!volumeIds.has(volume)) problem(`metamap entry for unknown volume #${volume} block ${lba}`);
      if (id === ZERO_BLOCK) zeroBlocks++;
      else if (id === MASK_BLOCK) {
        masks++;
        if (!state.tree?.links[volume])
          problem(`volume #${volume} block ${lba}: a hole over a parent, but the volume has no parent`);
      } else {
        refs.set(id, (refs.get(id) ?? 0) + 1);
        perVolume.set(volume, (perVolume.get(volume) ?? 0) + 1);
      }
    };
    if (meta) forEachMeta(meta, null, entry, (err) => problem(err.message));
    // A store not yet converted to pages (the gateway converts it when it opens it).
    for (const { key, value } of legacyMeta?.getRange({}) ?? []) {
      const { volume, lba } = decodeMetaKey(key as Buffer);
      const v = value as Buffer;
      if (v.length === 8) entry(volume, lba, decodeId(v));
      else problem(`volume #${volume} block ${lba}: metamap entry of ${v.length} bytes`);
    }

    const live = new Map<number, number>(); // segment -> live record bytes
    let dataBlocks = 0;
    let maxId = 0;
    const fds = new Map<number, number>();
    const fdOf = (seg: number): number | undefined => {
      if (!fds.has(seg)) {
        try {
          fds.set(seg, fs.openSync(path.join(storeDir, 'segments', segmentFileName(seg)), 'r'));
        } catch {
          return undefined;
        }
      }
      return fds.get(seg);
    };
    for (const { id, entry } of dataEntries({ data, legacyData }, (err) => problem(err.message))) {
      dataBlocks++;
      const e = decodeDataEntry(entry);
      const counted = refs.get(id) ?? 0;
      refs.delete(id);
      if (e.refcount !== counted)
        problem(`block ${id}: reference count ${e.refcount}, but ${counted} references`);
      const fd = fdOf(e.segment);
      if (fd === undefined) {
        problem(`block ${id}: segment ${e.segment} is missing`);
        continue;
      }
      if (e.refcount === 0 && !zeroRef.has(id))
        problem(`block ${id}: no references, and not queued for deletion (its space would never come back)`);
      if (e.storedLength > BLOCK) {
        problem(`block ${id}: datamap entry claims ${e.storedLength} stored bytes`);
        continue;
      }
      const rec = Buffer.alloc(RECORD_HEADER + e.storedLength);
      try {
        // An unreadable record (EIO) is one problem, not the end of the check.
        const n = fs.readSync(fd, rec, 0, rec.length, e.offset);
        if (n !== rec.length)
          throw new CorruptBlockError(`block ${id}: record cut short in segment ${e.segment}`);
        decodeRecord(rec, id, e.hash, hasher);
      } catch (err) {
        problem(err instanceof CorruptBlockError ? err.message : `block ${id}: ${(err as Error).message}`);
      }
      live.set(e.segment, (live.get(e.segment) ?? 0) + rec.length);
      // A copy made past a hash collision (or a damaged candidate) is deliberately left out
      // of the hash index: its absence there is not an inconsistency.
      maxId = Math.max(maxId, id);
    }
    for (const [id, count] of refs) problem(`block ${id}: ${count} metamap references but no datamap entry`);

    // The compactor deletes a segment once its recorded live bytes reach zero: they must be right.
    const recorded = state.segmentLive ?? {};
    for (const seg of new Set([...live.keys(), ...Object.keys(recorded).map(Number)])) {
      const want = live.get(seg) ?? 0;
      const have = recorded[seg] ?? 0;
      if (want !== have) problem(`segment ${seg}: ${have} live bytes recorded, ${want} found`);
    }
    if (state.nextBlockId <= maxId)
      problem(`next block id ${state.nextBlockId} is not above the highest in use, ${maxId}`);
    if (state.uniqueBlocks !== dataBlocks)
      problem(`store counts ${state.uniqueBlocks} unique blocks, found ${dataBlocks}`);
    if (state.zeroBlocks !== zeroBlocks)
      problem(`store counts ${state.zeroBlocks} zero blocks, found ${zeroBlocks}`);
    const mapped = metaEntries - zeroBlocks - masks;
    if (state.mappedBlocks !== mapped)
      problem(`store counts ${state.mappedBlocks} mapped blocks, found ${mapped}`);
    // Stores from before the per-volume counts have none to check (the gateway counts them at open).
    if (state.volumeBlocks) {
      for (const v of new Set([...perVolume.keys(), ...Object.keys(state.volumeBlocks).map(Number)])) {
        const want = perVolume.get(v) ?? 0;
        const have = state.volumeBlocks[v] ?? 0;
        if (want !== have) problem(`volume #${v}: ${have} data blocks counted, ${want} found`);
      }
    }

    let segmentBytes = 0;
    let spareBytes = 0;
    const segDir = path.join(storeDir, 'segments');
    for (const f of fs.existsSync(segDir) ? fs.readdirSync(segDir) : []) {
      if (f.endsWith('.seg')) segmentBytes += fs.statSync(path.join(segDir, f)).size;
      else if (isSpareFile(f)) spareBytes += fs.statSync(path.join(segDir, f)).size;
    }
    for (const fd of fds.values()) fs.closeSync(fd);
    const liveBytes = [...live.values()].reduce((a, b) => a + b, 0);
    if (problemCount > problems.length) problems.push(`... and ${problemCount - problems.length} more`);
    return {
      volumes: volumeIds.size,
      metaEntries,
      zeroBlocks,
      dataBlocks,
      segmentBytes,
      liveBytes,
      orphanedBytes: Math.max(0, segmentBytes - liveBytes),
      spareBytes,
      problems,
    };
  } finally {
    void env.close();
  }
}
