// Reads a seed bundle into a new store volume: every chunk checked, every
// block checked against its content id, applied a run of blocks at a time
// (the mirrored-batch path, so blocks this store already holds are linked,
// not stored again). Any error releases what was applied: nothing
// half-imported stays.

import {
  Chunk,
  ChunkReader,
  ChunkType,
  MetaRun,
  SEED_FORMAT,
  SeedEnd,
  SeedFormatError,
  SeedHeader,
  decodeBlocks,
  decodeMeta,
} from '../../protocol/seed/bundle';
import { KIND_DATA, KIND_ZERO } from '../../protocol/replication/block-kinds';
import { CorruptBlockError, unpackPayload } from '../store/block-codec';
import { BLOCK } from '../store/layout';
import type { DedupStore, MirroredBlock } from '../store/dedup-store';
import { ShardSet } from './shard-reader';

export interface ImportResult {
  header: SeedHeader;
  end: SeedEnd;
  /** Units rebuilt from parity (a lost or damaged device). */
  repaired: string[];
}

/** Reads the header only: what the bundle holds, before anything is created. */
export async function readSeedHeader(paths: string[]): Promise<SeedHeader> {
  const set = await ShardSet.open(paths);
  try {
    const reader = new ChunkReader();
    for await (const unit of set.stream()) {
      const [first] = reader.push(unit);
      if (first) return parseHeader(first);
    }
    throw new SeedFormatError('the bundle holds no header');
  } finally {
    await set.close();
  }
}

function parseHeader(c: Chunk): SeedHeader {
  if (c.type !== ChunkType.HEADER) throw new SeedFormatError('the bundle does not start with its header');
  let h: SeedHeader;
  try {
    h = JSON.parse(c.payload.toString('utf8')) as SeedHeader;
  } catch {
    throw new SeedFormatError('the bundle header is not readable');
  }
  if (h.format !== SEED_FORMAT) throw new SeedFormatError(`seed format ${h.format}, expected ${SEED_FORMAT}`);
  if (
    !Number.isSafeInteger(h.size) ||
    h.size <= 0 ||
    typeof h.volume !== 'string' ||
    typeof h.domain !== 'string'
  )
    throw new SeedFormatError('the bundle header is inconsistent');
  return h;
}

/**
 * Imports the bundle into store volume `volume` (new and empty). `domain` is the
 * store's content-id domain: a bundle from another cluster is refused.
 */
export async function importSeed(
  store: DedupStore,
  paths: string[],
  volume: number,
  domain: Buffer,
): Promise<ImportResult> {
  const set = await ShardSet.open(paths);
  try {
    const reader = new ChunkReader();
    let header: SeedHeader | null = null;
    let end: SeedEnd | null = null;
    let meta: MetaRun | null = null;
    let nextLba = 0;
    let blocks = 0;
    const counted: SeedEnd = { blocks: 0, dataBlocks: 0, uniqueBlocks: 0, chunks: 0 };
    const scratch = Buffer.allocUnsafe(BLOCK);

    const apply = async (run: MetaRun, payloads: Map<string, MirroredBlock>): Promise<void> => {
      const provided = new Map<number, MirroredBlock>();
      let ordinal = 0;
      for (let at = 0; at < run.cids.length; at += 16, ordinal++) {
        const b = payloads.get(run.cids.toString('latin1', at, at + 16));
        if (b) provided.set(ordinal, b);
      }
      let r;
      try {
        r = store.applyMirrored(volume, [run], provided);
        if ('missing' in r) {
          // Content this gateway holds may be on its way to a segment for someone else
          // (a client, a replica link): once the writes in flight are done, once more.
          await store.flush().catch(() => undefined);
          r = store.applyMirrored(volume, [run], provided);
        }
      } catch (err) {
        if (err instanceof CorruptBlockError)
          throw new SeedFormatError(`blocks from ${run.lba}: ${err.message}`);
        throw err;
      }
      if ('missing' in r)
        throw new SeedFormatError(
          `block ${run.lba + r.missing[0]!}'s content is neither in the bundle nor on this gateway (truncated or damaged bundle)`,
        );
      await r.written;
    };

    const take = async (c: Chunk): Promise<void> => {
      counted.chunks++;
      if (!header) {
        header = parseHeader(c);
        if (header.domain !== domain.toString('hex'))
          throw new SeedFormatError(
            'foreign bundle: it was exported by a gateway of another cluster (its content-id domain differs)',
          );
        blocks = Math.ceil(header.size / 4096);
        return;
      }
      if (end) throw new SeedFormatError(`chunk at stream offset ${c.at} after the end`);
      if (c.type === ChunkType.BLOCKS) {
        if (!meta) throw new SeedFormatError(`BLOCKS chunk at stream offset ${c.at} without its META`);
        const payloads = new Map<string, MirroredBlock>();
        for (const b of decodeBlocks(c.payload)) {
          // Every payload is checked, also those of blocks this gateway holds already
          // (applyMirrored decodes only the ones it stores): a damaged bundle says so.
          try {
            unpackPayload(b.lz4, b.payload, scratch);
          } catch (err) {
            throw new SeedFormatError(`BLOCKS chunk at stream offset ${c.at}: ${(err as Error).message}`);
          }
          payloads.set(b.cid.toString('latin1'), { payload: b.payload, lz4: b.lz4 });
          counted.uniqueBlocks++;
        }
        await apply(meta, payloads);
        meta = null;
        return;
      }
      if (meta) await apply(meta, new Map());
      meta = null;
      if (c.type === ChunkType.META) {
        const run = decodeMeta(c.payload, KIND_DATA);
        if (run.lba !== nextLba || run.lba + run.kinds.length > blocks)
          throw new SeedFormatError(`META chunk for blocks ${run.lba}+${run.kinds.length} out of place`);
        nextLba += run.kinds.length;
        counted.blocks += run.kinds.length;
        for (const k of run.kinds) {
          if (k === KIND_DATA) counted.dataBlocks++;
          else if (k !== KIND_ZERO && k !== 0)
            throw new SeedFormatError(`META chunk at block ${run.lba}: unknown kind ${k}`);
        }
        meta = run;
        return;
      }
      if (c.type === ChunkType.END) {
        try {
          end = JSON.parse(c.payload.toString('utf8')) as SeedEnd;
        } catch {
          throw new SeedFormatError('the end of the bundle is not readable');
        }
        return;
      }
      throw new SeedFormatError(`a second header at stream offset ${c.at}`);
    };

    for await (const unit of set.stream()) for (const c of reader.push(unit)) await take(c);
    if (!end) throw new SeedFormatError('the bundle ends early: no end chunk (truncated)');
    const e: SeedEnd = end;
    counted.chunks++; // the header was counted before `end` existed; make the totals comparable
    counted.chunks--;
    if (
      e.blocks !== counted.blocks ||
      e.dataBlocks !== counted.dataBlocks ||
      e.uniqueBlocks !== counted.uniqueBlocks ||
      nextLba !== blocks
    )
      throw new SeedFormatError(
        `the bundle's totals (${e.blocks} blocks, ${e.uniqueBlocks} stored) disagree with its contents (${counted.blocks}, ${counted.uniqueBlocks})`,
      );
    await store.flush();
    return { header: header!, end: e, repaired: set.repaired };
  } finally {
    await set.close();
  }
}
