// Pure codecs for the transmission phase: request headers, simple replies,
// structured reply chunks. Encoders write into caller-owned buffers so the
// session can place a header directly in front of its payload.
//
// Cookies are opaque 64-bit values that are only ever echoed, so they travel
// as two 32-bit halves: no BigInt on the hot path.

import { ChunkType, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, Size } from './constants';
import { NbdProtocolError } from './errors';

const TWO_32 = 4294967296;

export interface Request {
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  /** Exact below 2^53; larger wire offsets decode to a value beyond any export's end. */
  offset: number;
  length: number;
}

export function decodeRequest(buf: Buffer, at: number): Request {
  const magic = buf.readUInt32BE(at);
  if (magic !== REQUEST_MAGIC) {
    throw new NbdProtocolError('ERR_NBD_BAD_MAGIC', `bad request magic 0x${magic.toString(16)}`);
  }
  return {
    flags: buf.readUInt16BE(at + 4),
    type: buf.readUInt16BE(at + 6),
    cookieHi: buf.readUInt32BE(at + 8),
    cookieLo: buf.readUInt32BE(at + 12),
    offset: buf.readUInt32BE(at + 16) * TWO_32 + buf.readUInt32BE(at + 20),
    length: buf.readUInt32BE(at + 24),
  };
}

export function encodeRequest(req: Request, buf: Buffer, at: number): number {
  buf.writeUInt32BE(REQUEST_MAGIC, at);
  buf.writeUInt16BE(req.flags, at + 4);
  buf.writeUInt16BE(req.type, at + 6);
  buf.writeUInt32BE(req.cookieHi, at + 8);
  buf.writeUInt32BE(req.cookieLo, at + 12);
  buf.writeUInt32BE(Math.floor(req.offset / TWO_32), at + 16);
  buf.writeUInt32BE(req.offset % TWO_32, at + 20);
  buf.writeUInt32BE(req.length, at + 24);
  return at + Size.REQUEST;
}

export interface SimpleReply {
  error: number;
  cookieHi: number;
  cookieLo: number;
}

export function encodeSimpleReply(
  buf: Buffer,
  at: number,
  error: number,
  cookieHi: number,
  cookieLo: number,
): number {
  buf.writeUInt32BE(SIMPLE_REPLY_MAGIC, at);
  buf.writeUInt32BE(error, at + 4);
  buf.writeUInt32BE(cookieHi, at + 8);
  buf.writeUInt32BE(cookieLo, at + 12);
  return at + Size.SIMPLE_REPLY;
}

export function decodeSimpleReply(buf: Buffer, at: number): SimpleReply {
  const magic = buf.readUInt32BE(at);
  if (magic !== SIMPLE_REPLY_MAGIC) {
    throw new NbdProtocolError('ERR_NBD_BAD_MAGIC', `bad simple reply magic 0x${magic.toString(16)}`);
  }
  return {
    error: buf.readUInt32BE(at + 4),
    cookieHi: buf.readUInt32BE(at + 8),
    cookieLo: buf.readUInt32BE(at + 12),
  };
}

export interface ChunkHeader {
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  length: number;
}

export function encodeChunkHeader(
  buf: Buffer,
  at: number,
  flags: number,
  type: number,
  cookieHi: number,
  cookieLo: number,
  length: number,
): number {
  buf.writeUInt32BE(STRUCTURED_REPLY_MAGIC, at);
  buf.writeUInt16BE(flags, at + 4);
  buf.writeUInt16BE(type, at + 6);
  buf.writeUInt32BE(cookieHi, at + 8);
  buf.writeUInt32BE(cookieLo, at + 12);
  buf.writeUInt32BE(length, at + 16);
  return at + Size.STRUCTURED_REPLY_HEADER;
}

export function decodeChunkHeader(buf: Buffer, at: number): ChunkHeader {
  const magic = buf.readUInt32BE(at);
  if (magic !== STRUCTURED_REPLY_MAGIC) {
    throw new NbdProtocolError('ERR_NBD_BAD_MAGIC', `bad structured reply magic 0x${magic.toString(16)}`);
  }
  return {
    flags: buf.readUInt16BE(at + 4),
    type: buf.readUInt16BE(at + 6),
    cookieHi: buf.readUInt32BE(at + 8),
    cookieLo: buf.readUInt32BE(at + 12),
    length: buf.readUInt32BE(at + 16),
  };
}

/** Bytes of an OFFSET_DATA chunk before its data: header plus the 64-bit offset. */
export const OFFSET_DATA_PREFIX = Size.STRUCTURED_REPLY_HEADER + 8;

export function encodeOffsetDataPrefix(
  buf: Buffer,
  at: number,
  flags: number,
  cookieHi: number,
  cookieLo: number,
  offset: number,
  dataLength: number,
): number {
  at = encodeChunkHeader(buf, at, flags, ChunkType.OFFSET_DATA, cookieHi, cookieLo, 8 + dataLength);
  writeU64(buf, at, offset);
  return at + 8;
}

export interface Extent {
  length: number;
  flags: number;
}

export type ChunkPayload =
  | { type: typeof ChunkType.NONE }
  | { type: typeof ChunkType.OFFSET_DATA; offset: number; data: Buffer }
  | { type: typeof ChunkType.OFFSET_HOLE; offset: number; holeLength: number }
  | { type: typeof ChunkType.BLOCK_STATUS; contextId: number; extents: Extent[] }
  | { type: typeof ChunkType.ERROR; error: number; message: string }
  | { type: typeof ChunkType.ERROR_OFFSET; error: number; message: string; offset: number };

export function chunkPayloadSize(p: ChunkPayload): number {
  switch (p.type) {
    case ChunkType.NONE:
      return 0;
    case ChunkType.OFFSET_DATA:
      return 8 + p.data.length;
    case ChunkType.OFFSET_HOLE:
      return 12;
    case ChunkType.BLOCK_STATUS:
      return 4 + 8 * p.extents.length;
    case ChunkType.ERROR:
      return 6 + Buffer.byteLength(p.message);
    case ChunkType.ERROR_OFFSET:
      return 6 + Buffer.byteLength(p.message) + 8;
  }
}

/** A whole chunk (header and payload) as one buffer; for the colder reply kinds. */
export function encodeChunk(flags: number, cookieHi: number, cookieLo: number, p: ChunkPayload): Buffer {
  const size = chunkPayloadSize(p);
  const buf = Buffer.allocUnsafe(Size.STRUCTURED_REPLY_HEADER + size);
  let at = encodeChunkHeader(buf, 0, flags, p.type, cookieHi, cookieLo, size);
  switch (p.type) {
    case ChunkType.NONE:
      break;
    case ChunkType.OFFSET_DATA:
      writeU64(buf, at, p.offset);
      p.data.copy(buf, at + 8);
      break;
    case ChunkType.OFFSET_HOLE:
      writeU64(buf, at, p.offset);
      buf.writeUInt32BE(p.holeLength, at + 8);
      break;
    case ChunkType.BLOCK_STATUS:
      buf.writeUInt32BE(p.contextId, at);
      at += 4;
      for (const e of p.extents) {
        buf.writeUInt32BE(e.length, at);
        buf.writeUInt32BE(e.flags, at + 4);
        at += 8;
      }
      break;
    case ChunkType.ERROR:
    case ChunkType.ERROR_OFFSET: {
      const msgLen = Buffer.byteLength(p.message);
      buf.writeUInt32BE(p.error, at);
      buf.writeUInt16BE(msgLen, at + 4);
      buf.write(p.message, at + 6);
      if (p.type === ChunkType.ERROR_OFFSET) writeU64(buf, at + 6 + msgLen, p.offset);
      break;
    }
  }
  return buf;
}

/** Decodes a chunk payload (the bytes after the 20-byte header) of a known type. */
export function decodeChunkPayload(type: number, payload: Buffer): ChunkPayload {
  const need = (n: number) => {
    if (payload.length < n) {
      throw new NbdProtocolError(
        'ERR_NBD_TRUNCATED',
        `chunk type ${type} payload of ${payload.length} bytes`,
      );
    }
  };
  switch (type) {
    case ChunkType.NONE:
      return { type };
    case ChunkType.OFFSET_DATA:
      need(8);
      return { type, offset: readU64(payload, 0), data: payload.subarray(8) };
    case ChunkType.OFFSET_HOLE:
      need(12);
      return { type, offset: readU64(payload, 0), holeLength: payload.readUInt32BE(8) };
    case ChunkType.BLOCK_STATUS: {
      need(4);
      if ((payload.length - 4) % 8 !== 0) {
        throw new NbdProtocolError('ERR_NBD_TRUNCATED', 'block status payload is not whole extents');
      }
      const extents: Extent[] = [];
      for (let at = 4; at < payload.length; at += 8) {
        extents.push({ length: payload.readUInt32BE(at), flags: payload.readUInt32BE(at + 4) });
      }
      return { type, contextId: payload.readUInt32BE(0), extents };
    }
    case ChunkType.ERROR:
    case ChunkType.ERROR_OFFSET: {
      need(6);
      const msgLen = payload.readUInt16BE(4);
      need(6 + msgLen + (type === ChunkType.ERROR_OFFSET ? 8 : 0));
      const message = payload.toString('utf8', 6, 6 + msgLen);
      const error = payload.readUInt32BE(0);
      if (type === ChunkType.ERROR) return { type, error, message };
      return { type, error, message, offset: readU64(payload, 6 + msgLen) };
    }
    default:
      throw new NbdProtocolError('ERR_NBD_TRUNCATED', `unknown chunk type ${type}`);
  }
}

export function writeU64(buf: Buffer, at: number, value: number): void {
  buf.writeUInt32BE(Math.floor(value / TWO_32), at);
  buf.writeUInt32BE(value % TWO_32, at + 4);
}

export function readU64(buf: Buffer, at: number): number {
  return buf.readUInt32BE(at) * TWO_32 + buf.readUInt32BE(at + 4);
}
