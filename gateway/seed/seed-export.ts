// Writes a seed bundle of a snapshot (immutable, so the volume stays online and
// keeps changing): the header, then for every run of 1024 blocks its kinds and
// content ids, and the stored payloads of the content ids the bundle does not
// hold yet. A failure removes the half-written files.

import {
  ChunkType,
  SeedEnd,
  SeedHeader,
  SeedBlock,
  encodeBlocks,
  encodeChunk,
  encodeMeta,
} from '../../protocol/seed/bundle';
import type { DedupStore } from '../store/dedup-store';
import { ShardWriter } from './shard-writer';

const RUN = 1024;

export async function exportSeed(
  store: DedupStore,
  snapshot: number,
  header: SeedHeader,
  paths: string[],
): Promise<SeedEnd & { streamBytes: number }> {
  const writer = await ShardWriter.create(paths, header.bundleId);
  try {
    await writer.write(encodeChunk(ChunkType.HEADER, Buffer.from(JSON.stringify(header))));
    const blocks = Math.ceil(header.size / 4096);
    /** Content ids already in the bundle (latin1 keys). */
    const seen = new Set<string>();
    const end: SeedEnd = { blocks, dataBlocks: 0, uniqueBlocks: 0, chunks: 1 };
    for (let lba = 0; lba < blocks; lba += RUN) {
      const range = store.captureRange(snapshot, lba, Math.min(RUN, blocks - lba));
      await writer.write(encodeChunk(ChunkType.META, encodeMeta(range)));
      end.chunks++;
      const fresh: SeedBlock[] = [];
      for (const src of range.sources) {
        end.dataBlocks++;
        const key = src.hash.toString('latin1');
        if (seen.has(key)) continue;
        seen.add(key);
        const { lz4, payload } = await store.sourcePayload(src);
        fresh.push({ cid: src.hash, lz4, payload });
      }
      if (fresh.length) {
        await writer.write(encodeChunk(ChunkType.BLOCKS, encodeBlocks(fresh)));
        end.chunks++;
        end.uniqueBlocks += fresh.length;
      }
    }
    end.chunks++;
    await writer.write(encodeChunk(ChunkType.END, Buffer.from(JSON.stringify(end))));
    const streamBytes = await writer.finish();
    return { ...end, streamBytes };
  } catch (err) {
    await writer.abort();
    throw err;
  }
}
