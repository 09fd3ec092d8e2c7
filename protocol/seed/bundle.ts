// The seed bundle: a volume's point-in-time contents on portable media, to
// start a replica across a slow link. Pure codecs; the gateway writes and
// reads the files (gateway/seed/).
//
// The bundle is one logical stream of chunks, each with its own SHA-256:
//   HEADER  JSON: what volume, how big, which content-id domain, which point;
//   META    the block kinds and content ids of a run of blocks;
//   BLOCKS  the stored payloads (lz4 or raw) of content ids not yet in the bundle;
//   END     JSON totals, so a truncated stream is caught.
// The stream is cut into units of UNIT bytes laid across the target files
// (shards) in rows, RAID-5 style: with N targets, N-1 hold data and one
// holds each row's XOR parity, so any one lost device can be rebuilt. With one
// target there is no parity. Every unit carries its own SHA-256, so a damaged
// unit is known for what it is and rebuilt from the others in its row.

import crypto from 'node:crypto';

export const UNIT = 1024 * 1024;
/** Bytes of a shard file's header (JSON, zero-padded). */
export const SHARD_HEADER_BYTES = 4096;
export const SHARD_MAGIC = 'blockgate-seed';
export const SHARD_VERSION = 1;
const CHUNK_MAGIC = 0x42475343; // 'BGSC'
export const CHUNK_HEADER_BYTES = 4 + 1 + 3 + 4 + 32;
/** A chunk larger than this is not one of ours (a META of 1024 blocks is ~17 KiB, BLOCKS ~4 MiB). */
export const MAX_CHUNK = 8 * 1024 * 1024;
export const SEED_FORMAT = 1;

export const ChunkType = { HEADER: 1, META: 2, BLOCKS: 3, END: 4 } as const;
export type ChunkTypeValue = (typeof ChunkType)[keyof typeof ChunkType];
const TYPE_NAMES: Record<number, string> = { 1: 'HEADER', 2: 'META', 3: 'BLOCKS', 4: 'END' };

export class SeedFormatError extends Error {
  override name = 'SeedFormatError';
  readonly code = 'ERR_SEED_FORMAT';
}

export interface SeedHeader {
  format: number;
  bundleId: string;
  volume: string;
  size: number;
  /** contentDomain() of the exporting store, hex: only stores of one cluster share content ids. */
  domain: string;
  /** The exporting gateway and the volume's generation there. */
  gateway: string;
  generation: number;
  /** The snapshot on the exporting gateway that marks the export point. */
  snapshot: string;
  exportedAt: string;
}

export interface SeedEnd {
  blocks: number;
  dataBlocks: number;
  uniqueBlocks: number;
  chunks: number;
}

export interface ShardHeader {
  magic: string;
  version: number;
  bundleId: string;
  shard: number;
  shards: number;
  unit: number;
  /** Bytes of the logical stream (units are padded to UNIT). */
  streamBytes: number;
  /** Set once the export finished: a shard without it is the remains of an interrupted export. */
  complete: boolean;
}

// ---- chunks ------------------------------------------------------------------------------

export function encodeChunk(type: ChunkTypeValue, payload: Buffer): Buffer {
  const out = Buffer.allocUnsafe(CHUNK_HEADER_BYTES + payload.length);
  out.writeUInt32BE(CHUNK_MAGIC, 0);
  out.writeUInt8(type, 4);
  out.fill(0, 5, 8);
  out.writeUInt32BE(payload.length, 8);
  crypto.createHash('sha256').update(payload).digest().copy(out, 12);
  payload.copy(out, CHUNK_HEADER_BYTES);
  return out;
}

export interface Chunk {
  type: ChunkTypeValue;
  payload: Buffer;
  /** Where the chunk starts in the stream, for error messages. */
  at: number;
}

/**
 * Parses chunks out of the stream as its bytes arrive, checking each one's
 * checksum; errors name the chunk and its place in the stream.
 */
export class ChunkReader {
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private offset = 0;
  private count = 0;

  push(data: Buffer): Chunk[] {
    this.pending.push(data);
    this.pendingBytes += data.length;
    const out: Chunk[] = [];
    for (;;) {
      if (this.pendingBytes < CHUNK_HEADER_BYTES) break;
      const head = this.peek(CHUNK_HEADER_BYTES);
      if (head.readUInt32BE(0) !== CHUNK_MAGIC)
        throw new SeedFormatError(
          `no chunk at stream offset ${this.offset} (chunk ${this.count}): bad magic`,
        );
      const type = head.readUInt8(4);
      if (!TYPE_NAMES[type])
        throw new SeedFormatError(
          `chunk ${this.count} at stream offset ${this.offset}: unknown type ${type}`,
        );
      const length = head.readUInt32BE(8);
      if (length > MAX_CHUNK)
        throw new SeedFormatError(
          `chunk ${this.count} at stream offset ${this.offset}: ${length} bytes is too long`,
        );
      if (this.pendingBytes < CHUNK_HEADER_BYTES + length) break;
      const whole = this.take(CHUNK_HEADER_BYTES + length);
      const payload = whole.subarray(CHUNK_HEADER_BYTES);
      const sum = crypto.createHash('sha256').update(payload).digest();
      if (!sum.equals(whole.subarray(12, 44)))
        throw new SeedFormatError(
          `chunk ${this.count} (${TYPE_NAMES[type]}) at stream offset ${this.offset}: checksum mismatch`,
        );
      out.push({ type: type as ChunkTypeValue, payload, at: this.offset });
      this.offset += whole.length;
      this.count++;
    }
    return out;
  }

  /** Bytes received that do not make a whole chunk (a truncated stream leaves some). */
  get leftover(): number {
    return this.pendingBytes;
  }

  private peek(n: number): Buffer {
    if (this.pending[0]!.length < n) this.pending = [Buffer.concat(this.pending)];
    return this.pending[0]!.subarray(0, n);
  }

  private take(n: number): Buffer {
    const all = this.pending.length === 1 ? this.pending[0]! : Buffer.concat(this.pending);
    const out = Buffer.from(all.subarray(0, n));
    const rest = all.subarray(n);
    this.pending = rest.length ? [rest] : [];
    this.pendingBytes -= n;
    return out;
  }
}

// ---- META: kinds and content ids of a run of blocks ----------------------------------------

export interface MetaRun {
  lba: number;
  /** One byte per block: KIND_HOLE, KIND_ZERO or KIND_DATA (protocol/replication/block-kinds). */
  kinds: Buffer;
  /** 16 bytes per data block, in block order. */
  cids: Buffer;
}

export function encodeMeta(run: MetaRun): Buffer {
  const out = Buffer.allocUnsafe(12 + run.kinds.length + run.cids.length);
  out.writeUIntBE(run.lba, 0, 6);
  out.fill(0, 6, 8);
  out.writeUInt32BE(run.kinds.length, 8);
  run.kinds.copy(out, 12);
  run.cids.copy(out, 12 + run.kinds.length);
  return out;
}

export function decodeMeta(b: Buffer, dataKind: number): MetaRun {
  if (b.length < 12) throw new SeedFormatError(`META chunk of ${b.length} bytes`);
  const lba = b.readUIntBE(0, 6);
  const count = b.readUInt32BE(8);
  if (b.length < 12 + count)
    throw new SeedFormatError(`META chunk claims ${count} blocks in ${b.length} bytes`);
  const kinds = b.subarray(12, 12 + count);
  let data = 0;
  for (const k of kinds) if (k === dataKind) data++;
  const cids = b.subarray(12 + count);
  if (cids.length !== data * 16)
    throw new SeedFormatError(
      `META chunk at block ${lba}: ${data} data blocks but ${cids.length / 16} content ids`,
    );
  return { lba, kinds, cids };
}

// ---- BLOCKS: stored payloads by content id --------------------------------------------------

export interface SeedBlock {
  cid: Buffer;
  lz4: boolean;
  payload: Buffer;
}

export function encodeBlocks(blocks: SeedBlock[]): Buffer {
  let size = 0;
  for (const b of blocks) size += 19 + b.payload.length;
  const out = Buffer.allocUnsafe(size);
  let at = 0;
  for (const b of blocks) {
    b.cid.copy(out, at);
    out.writeUInt8(b.lz4 ? 1 : 0, at + 16);
    out.writeUInt16BE(b.payload.length, at + 17);
    b.payload.copy(out, at + 19);
    at += 19 + b.payload.length;
  }
  return out;
}

export function decodeBlocks(b: Buffer): SeedBlock[] {
  const out: SeedBlock[] = [];
  for (let at = 0; at < b.length;) {
    if (at + 19 > b.length) throw new SeedFormatError('BLOCKS chunk ends inside a block header');
    const length = b.readUInt16BE(at + 17);
    const flags = b.readUInt8(at + 16);
    if (flags > 1) throw new SeedFormatError(`BLOCKS chunk: unknown block flags ${flags}`);
    if (length === 0 || length > 4096 || at + 19 + length > b.length)
      throw new SeedFormatError(`BLOCKS chunk: block of ${length} bytes at offset ${at}`);
    out.push({
      cid: b.subarray(at, at + 16),
      lz4: flags === 1,
      payload: b.subarray(at + 19, at + 19 + length),
    });
    at += 19 + length;
  }
  return out;
}

// ---- shards -------------------------------------------------------------------------------

/** Shards holding data: all but the parity shard (none with one target). */
export function dataShards(shards: number): number {
  return shards === 1 ? 1 : shards - 1;
}

export function encodeShardHeader(h: ShardHeader): Buffer {
  const json = Buffer.from(JSON.stringify(h));
  if (json.length >= SHARD_HEADER_BYTES) throw new Error('shard header too long');
  const out = Buffer.alloc(SHARD_HEADER_BYTES);
  json.copy(out);
  return out;
}

export function decodeShardHeader(b: Buffer, where: string): ShardHeader {
  const end = b.indexOf(0);
  let h: ShardHeader;
  try {
    h = JSON.parse(b.subarray(0, end < 0 ? b.length : end).toString('utf8')) as ShardHeader;
  } catch {
    throw new SeedFormatError(`${where}: not a blockgate seed bundle (unreadable header)`);
  }
  if (h?.magic !== SHARD_MAGIC) throw new SeedFormatError(`${where}: not a blockgate seed bundle`);
  if (h.version !== SHARD_VERSION)
    throw new SeedFormatError(`${where}: seed bundle version ${h.version}, expected ${SHARD_VERSION}`);
  const ints = [h.shard, h.shards, h.unit, h.streamBytes];
  if (
    !ints.every((n) => Number.isSafeInteger(n) && n >= 0) ||
    h.shards < 1 ||
    h.shard >= h.shards ||
    h.unit !== UNIT
  )
    throw new SeedFormatError(`${where}: inconsistent seed bundle header`);
  if (typeof h.bundleId !== 'string' || !/^[0-9a-f]{32}$/.test(h.bundleId))
    throw new SeedFormatError(`${where}: bad bundle id`);
  return h;
}

/** Bytes a unit takes in a shard file: its checksum, then UNIT bytes. */
export const UNIT_RECORD = 32 + UNIT;

export function unitChecksum(unit: Buffer): Buffer {
  return crypto.createHash('sha256').update(unit).digest();
}

/** XORs `b` into `into` (equal lengths). */
export function xorInto(into: Buffer, b: Buffer): void {
  if (into.byteOffset % 4 === 0 && b.byteOffset % 4 === 0 && into.length % 4 === 0) {
    const x = new Int32Array(into.buffer, into.byteOffset, into.length / 4);
    const y = new Int32Array(b.buffer, b.byteOffset, b.length / 4);
    for (let i = 0; i < x.length; i++) x[i] = x[i]! ^ y[i]!;
    return;
  }
  for (let i = 0; i < into.length; i++) into[i] = into[i]! ^ b[i]!;
}
