// Replication link frames: protobuf messages (link.proto) behind a 4-byte
// big-endian length. Pure: bytes in, frames out, however the stream is split.

import path from 'node:path';
import protobuf from 'protobufjs';
import { ByteQueue } from '../nbd/byte-queue';
import { CID_BYTES, KIND_DATA } from './block-kinds';
import { LinkProtocolError } from './errors';

// 2: block payloads as a table and one run of bytes (link.proto's Blocks), not a message each.
export const LINK_VERSION = 2;
const LENGTH_BYTES = 4;

// Compiled to dist/protocol/replication: the .proto stays in the source tree.
const root = protobuf.loadSync(
  path.join(__dirname, '..', '..', '..', 'protocol', 'replication', 'link.proto'),
);
const FrameType = root.lookupType('blockgate.replication.Frame');
const BatchType = root.lookupType('blockgate.replication.Batch');
const BlocksType = root.lookupType('blockgate.replication.Blocks');

/** A block table entry: ordinal, then length with the LZ4 bit (link.proto, above Blocks). */
const TABLE_ENTRY = 8;
const LZ4_BIT = 0x80000000;
const MAX_PAYLOAD = 0x7fffffff;

// Tags (field number << 3 | 2, length-delimited) of the fields written by hand: a
// frame's batch or blocks, and its block_data after the rest of the message.
const TAG_FRAME_BATCH = (8 << 3) | 2;
const TAG_FRAME_BLOCKS = (10 << 3) | 2;
const TAG_BATCH_DATA = (6 << 3) | 2;
const TAG_BLOCKS_DATA = (4 << 3) | 2;

export interface Hello {
  version: number;
  gatewayId: string;
  nonce: Buffer;
  maxFrame: number;
}

export interface Extent {
  lba: number;
  kinds: Buffer;
  cids: Buffer;
}

export interface WireBlock {
  ordinal: number;
  lz4: boolean;
  payload: Buffer;
}

export { CID_BYTES, KIND_DATA, KIND_HOLE, KIND_ZERO } from './block-kinds';

export type Frame =
  | { hello: Hello }
  | { proof: { mac: Buffer } }
  | { error: { code: string; message: string } }
  | { ping: { seq: number } }
  | { pong: { seq: number } }
  | { mirror: { volume: string; size: number; domain: Buffer; generation: number; seed?: Buffer } }
  | { mirrorReady: { volume: string; seeded?: boolean } }
  | { batch: { seq: number; extents: Extent[]; durable: boolean; blocks?: WireBlock[] } }
  | { need: { seq: number; ordinals: number[] } }
  | { blocks: { seq: number; blocks: WireBlock[] } }
  | { ack: { seq: number } }
  | { superseded: { volume: string; generation: number } }
  | { verifyChunks: { seq: number; first: number; digests: Buffer } }
  | { verifyChunksResult: { seq: number; mismatched: number[] } }
  | { verifyBlocks: { seq: number; lba: number; kinds: Buffer; cids: Buffer } }
  | { verifyBlocksResult: { seq: number; mismatched: number[] } }
  | { snapshot: { name: string } }
  | { cutover: { volume: string } }
  | { cutoverDone: { generation: number } }
  | { scrubBlocks: { seq: number; lba: number; count: number } }
  | { scrubBlocksResult: { seq: number; damaged: number[] } }
  | { fetchBlocks: { seq: number; lbas: number[] } };

export type FrameKind =
  | 'hello'
  | 'proof'
  | 'error'
  | 'ping'
  | 'pong'
  | 'mirror'
  | 'mirrorReady'
  | 'batch'
  | 'need'
  | 'blocks'
  | 'ack'
  | 'superseded'
  | 'verifyChunks'
  | 'verifyChunksResult'
  | 'verifyBlocks'
  | 'verifyBlocksResult'
  | 'snapshot'
  | 'cutover'
  | 'cutoverDone'
  | 'scrubBlocks'
  | 'scrubBlocksResult'
  | 'fetchBlocks';

export function frameKind(f: Frame): FrameKind {
  return Object.keys(f)[0] as FrameKind;
}

/** The frame with its length prefix, ready for the socket. */
export function encodeFrame(frame: Frame): Buffer {
  return Buffer.concat(encodeFrameParts(frame));
}

/**
 * The frame's bytes in parts, the length prefix in the first, for one corked socket
 * write. A frame carrying blocks is two parts: everything up to the block data, then
 * the payloads in one buffer (protobufjs would copy them once more, one field at a time).
 */
export function encodeFrameParts(frame: Frame): Buffer[] {
  if ('batch' in frame && frame.batch.blocks?.length) {
    const { blocks, ...rest } = frame.batch;
    return withBlocks(TAG_FRAME_BATCH, BatchType, rest, TAG_BATCH_DATA, blocks);
  }
  if ('blocks' in frame && frame.blocks.blocks.length)
    return withBlocks(
      TAG_FRAME_BLOCKS,
      BlocksType,
      { seq: frame.blocks.seq },
      TAG_BLOCKS_DATA,
      frame.blocks.blocks,
    );
  // An empty `blocks` list is no field of Batch or Blocks (version 1's are reserved):
  // protobufjs encodes only the fields the schema has.
  const body = FrameType.encode(FrameType.create(frame)).finish();
  const prefix = Buffer.allocUnsafe(LENGTH_BYTES);
  prefix.writeUInt32BE(body.length, 0);
  return [prefix, Buffer.from(body.buffer, body.byteOffset, body.byteLength)];
}

function varintBytes(n: number): number {
  let bytes = 1;
  while (n >= 0x80) {
    n = Math.floor(n / 0x80);
    bytes++;
  }
  return bytes;
}

function writeVarint(buf: Buffer, at: number, n: number): number {
  while (n >= 0x80) {
    buf[at++] = (n & 0x7f) | 0x80;
    n = Math.floor(n / 0x80);
  }
  buf[at++] = n;
  return at;
}

/**
 * A batch or blocks frame: the message without its block data through protobufjs, the
 * frame's field and the data field's tag and length by hand, then the payloads.
 */
function withBlocks(
  frameTag: number,
  type: protobuf.Type,
  fields: object,
  dataTag: number,
  blocks: WireBlock[],
): Buffer[] {
  const table = Buffer.allocUnsafe(blocks.length * TABLE_ENTRY);
  let dataBytes = 0;
  for (let i = 0; i < blocks.length; i++) {
    const b = blocks[i]!;
    if (b.payload.length > MAX_PAYLOAD) throw new RangeError(`block payload of ${b.payload.length} bytes`);
    table.writeUInt32LE(b.ordinal, i * TABLE_ENTRY);
    table.writeUInt32LE((b.lz4 ? LZ4_BIT : 0) + b.payload.length, i * TABLE_ENTRY + 4);
    dataBytes += b.payload.length;
  }
  const head = type.encode(type.create({ ...fields, blockTable: table })).finish();
  const inner = head.length + 1 + varintBytes(dataBytes) + dataBytes;
  const body = 1 + varintBytes(inner) + inner;
  const first = Buffer.allocUnsafe(LENGTH_BYTES + body - dataBytes);
  first.writeUInt32BE(body, 0);
  first[LENGTH_BYTES] = frameTag;
  let at = writeVarint(first, LENGTH_BYTES + 1, inner);
  first.set(head, at);
  at += head.length;
  first[at++] = dataTag;
  writeVarint(first, at, dataBytes);
  const data = Buffer.allocUnsafe(dataBytes);
  let off = 0;
  for (const b of blocks) {
    data.set(b.payload, off);
    off += b.payload.length;
  }
  return [first, data];
}

/**
 * A decoded bytes field as a Buffer over the frame's own bytes, not a copy: a batch
 * carries hundreds of block payloads, and copying each was a tenth of a replica's
 * work. The frame's bytes are never reused (each socket read is a fresh chunk).
 */
function viewOf(v: unknown): Buffer {
  if (Buffer.isBuffer(v)) return v;
  if (v instanceof Uint8Array) return Buffer.from(v.buffer, v.byteOffset, v.byteLength);
  // An absent field decodes as protobufjs's default, an empty array.
  return Buffer.from((v as number[] | undefined) ?? []);
}

/** uint64 fields decode as protobufjs Longs; sequence numbers stay well inside 2^53. */
function toNumber(v: unknown): number {
  return typeof v === 'number' ? v : Number((v as { toString(): string }).toString());
}

/** A repeated uint64 field of message `m` (absent: empty). */
function numbers(m: Record<string, unknown>, field: string): number[] {
  return ((m[field] as unknown[] | undefined) ?? []).map(toNumber);
}

/** One frame's protobuf bytes (without the length). Throws LinkProtocolError. */
export function decodeFrameBody(bytes: Uint8Array): Frame {
  let msg: protobuf.Message & Record<string, unknown>;
  try {
    msg = FrameType.decode(bytes) as protobuf.Message & Record<string, unknown>;
  } catch (err) {
    throw new LinkProtocolError('ERR_LINK_MALFORMED', `malformed frame: ${(err as Error).message}`);
  }
  const kind = msg['body'] as FrameKind | undefined;
  switch (kind) {
    case 'hello': {
      const h = msg['hello'] as Record<string, unknown>;
      return {
        hello: {
          version: (h['version'] as number) ?? 0,
          gatewayId: (h['gatewayId'] as string) ?? '',
          nonce: viewOf(h['nonce']),
          maxFrame: (h['maxFrame'] as number) ?? 0,
        },
      };
    }
    case 'proof':
      return { proof: { mac: viewOf((msg['proof'] as Record<string, unknown>)['mac']) } };
    case 'error': {
      const e = msg['error'] as Record<string, unknown>;
      return { error: { code: (e['code'] as string) ?? '', message: (e['message'] as string) ?? '' } };
    }
    case 'ping':
      return { ping: { seq: toNumber((msg['ping'] as Record<string, unknown>)['seq'] ?? 0) } };
    case 'pong':
      return { pong: { seq: toNumber((msg['pong'] as Record<string, unknown>)['seq'] ?? 0) } };
    case 'mirror': {
      const m = msg['mirror'] as Record<string, unknown>;
      return {
        mirror: {
          volume: (m['volume'] as string) ?? '',
          size: toNumber(m['size'] ?? 0),
          domain: viewOf(m['domain']),
          generation: toNumber(m['generation'] ?? 0),
          seed: viewOf(m['seed']),
        },
      };
    }
    case 'verifyChunks': {
      const m = msg['verifyChunks'] as Record<string, unknown>;
      const digests = viewOf(m['digests']);
      if (digests.length % 32 !== 0)
        throw new LinkProtocolError('ERR_LINK_MALFORMED', `chunk digests of ${digests.length} bytes`);
      return { verifyChunks: { seq: toNumber(m['seq'] ?? 0), first: toNumber(m['first'] ?? 0), digests } };
    }
    case 'verifyChunksResult':
    case 'verifyBlocksResult': {
      const m = msg[kind] as Record<string, unknown>;
      const r = {
        seq: toNumber(m['seq'] ?? 0),
        mismatched: numbers(m, 'mismatched'),
      };
      return kind === 'verifyChunksResult' ? { verifyChunksResult: r } : { verifyBlocksResult: r };
    }
    case 'verifyBlocks': {
      const m = msg['verifyBlocks'] as Record<string, unknown>;
      const e = { lba: toNumber(m['lba'] ?? 0), kinds: viewOf(m['kinds']), cids: viewOf(m['cids']) };
      checkExtent(e);
      return { verifyBlocks: { seq: toNumber(m['seq'] ?? 0), ...e } };
    }
    case 'snapshot':
      return { snapshot: { name: ((msg['snapshot'] as Record<string, unknown>)['name'] as string) ?? '' } };
    case 'cutover':
      return { cutover: { volume: ((msg['cutover'] as Record<string, unknown>)['volume'] as string) ?? '' } };
    case 'scrubBlocks': {
      const m = msg['scrubBlocks'] as Record<string, unknown>;
      return {
        scrubBlocks: {
          seq: toNumber(m['seq'] ?? 0),
          lba: toNumber(m['lba'] ?? 0),
          count: toNumber(m['count'] ?? 0),
        },
      };
    }
    case 'scrubBlocksResult': {
      const m = msg['scrubBlocksResult'] as Record<string, unknown>;
      return {
        scrubBlocksResult: {
          seq: toNumber(m['seq'] ?? 0),
          damaged: numbers(m, 'damaged'),
        },
      };
    }
    case 'fetchBlocks': {
      const m = msg['fetchBlocks'] as Record<string, unknown>;
      return {
        fetchBlocks: {
          seq: toNumber(m['seq'] ?? 0),
          lbas: numbers(m, 'lbas'),
        },
      };
    }
    case 'cutoverDone':
      return {
        cutoverDone: {
          generation: toNumber((msg['cutoverDone'] as Record<string, unknown>)['generation'] ?? 0),
        },
      };
    case 'superseded': {
      const m = msg['superseded'] as Record<string, unknown>;
      return {
        superseded: { volume: (m['volume'] as string) ?? '', generation: toNumber(m['generation'] ?? 0) },
      };
    }
    case 'mirrorReady': {
      const m = msg['mirrorReady'] as Record<string, unknown>;
      return { mirrorReady: { volume: (m['volume'] as string) ?? '', seeded: m['seeded'] === true } };
    }
    case 'batch': {
      const b = msg['batch'] as Record<string, unknown>;
      const extents = ((b['extents'] as Array<Record<string, unknown>> | undefined) ?? []).map((e) => ({
        lba: toNumber(e['lba'] ?? 0),
        kinds: viewOf(e['kinds']),
        cids: viewOf(e['cids']),
      }));
      for (const e of extents) checkExtent(e);
      return {
        batch: {
          seq: toNumber(b['seq'] ?? 0),
          extents,
          durable: (b['durable'] as boolean) ?? false,
          blocks: tableBlocks(b),
        },
      };
    }
    case 'need': {
      const n = msg['need'] as Record<string, unknown>;
      return {
        need: {
          seq: toNumber(n['seq'] ?? 0),
          ordinals: [...((n['ordinals'] as number[] | undefined) ?? [])],
        },
      };
    }
    case 'blocks': {
      const b = msg['blocks'] as Record<string, unknown>;
      return {
        blocks: {
          seq: toNumber(b['seq'] ?? 0),
          blocks: tableBlocks(b),
        },
      };
    }
    case 'ack':
      return { ack: { seq: toNumber((msg['ack'] as Record<string, unknown>)['seq'] ?? 0) } };
    default:
      // A field this version does not know decodes as a Frame with no body.
      throw new LinkProtocolError(
        'ERR_LINK_UNKNOWN_MESSAGE',
        'frame of a message type this gateway does not know',
      );
  }
}

/** An extent must carry one kind per block and one content id per data block. */
function checkExtent(e: Extent): void {
  let data = 0;
  for (const k of e.kinds) {
    if (k > KIND_DATA) throw new LinkProtocolError('ERR_LINK_MALFORMED', `extent block kind ${k}`);
    if (k === KIND_DATA) data++;
  }
  if (e.cids.length !== data * CID_BYTES)
    throw new LinkProtocolError(
      'ERR_LINK_MALFORMED',
      `extent at block ${e.lba} has ${data} data blocks and ${e.cids.length} bytes of content ids`,
    );
}

/** Cuts a byte stream into frames, refusing any longer than the current limit. */
export class FrameReader {
  private readonly queue = new ByteQueue();

  constructor(private limit: number) {}

  /** The longest frame accepted from now on (raised once a peer has authenticated). */
  setLimit(limit: number): void {
    this.limit = limit;
  }

  push(chunk: Buffer): void {
    this.queue.push(chunk);
  }

  /** The next whole frame, or null until more bytes arrive. Throws LinkProtocolError. */
  next(): Frame | null {
    if (this.queue.length < LENGTH_BYTES) return null;
    const length = this.queue.peek(LENGTH_BYTES).readUInt32BE(0);
    if (length > this.limit) {
      throw new LinkProtocolError(
        'ERR_LINK_FRAME_TOO_LARGE',
        `frame of ${length} bytes is over the limit of ${this.limit}`,
      );
    }
    if (this.queue.length < LENGTH_BYTES + length) return null;
    this.queue.skip(LENGTH_BYTES);
    return decodeFrameBody(this.queue.take(length));
  }
}

/** A message's block table and data as blocks whose payloads are views of the data. */
function tableBlocks(m: Record<string, unknown>): WireBlock[] {
  const table = viewOf(m['blockTable']);
  const data = viewOf(m['blockData']);
  if (table.length % TABLE_ENTRY !== 0)
    throw new LinkProtocolError('ERR_LINK_MALFORMED', `block table of ${table.length} bytes`);
  const blocks: WireBlock[] = new Array<WireBlock>(table.length / TABLE_ENTRY);
  let at = 0;
  for (let i = 0; i < blocks.length; i++) {
    const word = table.readUInt32LE(i * TABLE_ENTRY + 4);
    const length = word & MAX_PAYLOAD;
    if (at + length > data.length)
      throw new LinkProtocolError(
        'ERR_LINK_MALFORMED',
        `block table entry ${i} runs past the ${data.length} bytes of block data`,
      );
    blocks[i] = {
      ordinal: table.readUInt32LE(i * TABLE_ENTRY),
      lz4: word >= LZ4_BIT,
      payload: data.subarray(at, at + length),
    };
    at += length;
  }
  if (at !== data.length)
    throw new LinkProtocolError(
      'ERR_LINK_MALFORMED',
      `${data.length - at} bytes of block data beyond the block table`,
    );
  return blocks;
}
