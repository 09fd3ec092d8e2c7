// Replication link frames: protobuf messages (link.proto) behind a 4-byte
// big-endian length. Pure: bytes in, frames out, however the stream is split.

import path from 'node:path';
import protobuf from 'protobufjs';
import { ByteQueue } from '../nbd/byte-queue';
import { CID_BYTES, KIND_DATA } from './block-kinds';
import { LinkProtocolError } from './errors';

export const LINK_VERSION = 1;
const LENGTH_BYTES = 4;

// Compiled to dist/protocol/replication: the .proto stays in the source tree.
const root = protobuf.loadSync(
  path.join(__dirname, '..', '..', '..', 'protocol', 'replication', 'link.proto'),
);
const FrameType = root.lookupType('blockgate.replication.Frame');

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
  | { verifyChunks: { seq: number; digests: Buffer } }
  | { verifyChunksResult: { seq: number; mismatched: number[] } }
  | { verifyBlocks: { seq: number; lba: number; kinds: Buffer; cids: Buffer } }
  | { verifyBlocksResult: { seq: number; mismatched: number[] } }
  | { snapshot: { name: string } }
  | { cutover: { volume: string } }
  | { cutoverDone: { generation: number } };

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
  | 'cutoverDone';

export function frameKind(f: Frame): FrameKind {
  return Object.keys(f)[0] as FrameKind;
}

/** The frame with its length prefix, ready for the socket. */
export function encodeFrame(frame: Frame): Buffer {
  const [prefix, body] = encodeFrameParts(frame);
  return Buffer.concat([prefix, body]);
}

/**
 * The frame's length prefix and body, for a socket write of both without copying
 * the body (a batch's block payloads) into one buffer first.
 */
export function encodeFrameParts(frame: Frame): [Buffer, Uint8Array] {
  const body = FrameType.encode(FrameType.create(frame)).finish();
  const prefix = Buffer.allocUnsafe(LENGTH_BYTES);
  prefix.writeUInt32BE(body.length, 0);
  return [prefix, body];
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
      return { verifyChunks: { seq: toNumber(m['seq'] ?? 0), digests } };
    }
    case 'verifyChunksResult':
    case 'verifyBlocksResult': {
      const m = msg[kind] as Record<string, unknown>;
      const r = {
        seq: toNumber(m['seq'] ?? 0),
        mismatched: ((m['mismatched'] as unknown[] | undefined) ?? []).map(toNumber),
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
          blocks: wireBlocks(b['blocks']),
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
          blocks: wireBlocks(b['blocks']),
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

function wireBlocks(v: unknown): WireBlock[] {
  return ((v as Array<Record<string, unknown>> | undefined) ?? []).map((k) => ({
    ordinal: (k['ordinal'] as number) ?? 0,
    lz4: (k['lz4'] as boolean) ?? false,
    payload: viewOf(k['payload']),
  }));
}
