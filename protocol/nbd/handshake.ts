// Pure codecs for the handshake phase: greeting, client flags, option
// requests and replies, and the payloads of INFO/GO, LIST, and the
// meta-context options.

import { IHAVEOPT, Info, MAX_STRING, NBDMAGIC, OPTION_REPLY_MAGIC, Size } from './constants';
import { NbdProtocolError } from './errors';
import { readU64, writeU64 } from './transmission';

export function encodeServerGreeting(handshakeFlags: number): Buffer {
  const buf = Buffer.allocUnsafe(Size.SERVER_GREETING);
  buf.writeBigUInt64BE(NBDMAGIC, 0);
  buf.writeBigUInt64BE(IHAVEOPT, 8);
  buf.writeUInt16BE(handshakeFlags, 16);
  return buf;
}

export function decodeServerGreeting(buf: Buffer): number {
  if (buf.readBigUInt64BE(0) !== NBDMAGIC || buf.readBigUInt64BE(8) !== IHAVEOPT) {
    throw new NbdProtocolError('ERR_NBD_BAD_MAGIC', 'not a fixed-newstyle NBD greeting');
  }
  return buf.readUInt16BE(16);
}

export interface OptionHeader {
  option: number;
  length: number;
}

export function encodeOptionHeader(h: OptionHeader, buf: Buffer, at: number): number {
  buf.writeBigUInt64BE(IHAVEOPT, at);
  buf.writeUInt32BE(h.option, at + 8);
  buf.writeUInt32BE(h.length, at + 12);
  return at + Size.OPTION_HEADER;
}

export function decodeOptionHeader(buf: Buffer, at: number): OptionHeader {
  if (buf.readBigUInt64BE(at) !== IHAVEOPT) {
    throw new NbdProtocolError('ERR_NBD_BAD_MAGIC', 'option request without IHAVEOPT magic');
  }
  return { option: buf.readUInt32BE(at + 8), length: buf.readUInt32BE(at + 12) };
}

/** An option request as one buffer; what a client sends. */
export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const buf = Buffer.allocUnsafe(Size.OPTION_HEADER + data.length);
  encodeOptionHeader({ option, length: data.length }, buf, 0);
  data.copy(buf, Size.OPTION_HEADER);
  return buf;
}

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export function encodeOptionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const buf = Buffer.allocUnsafe(Size.OPTION_REPLY_HEADER + data.length);
  buf.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  buf.writeUInt32BE(option, 8);
  buf.writeUInt32BE(type, 12);
  buf.writeUInt32BE(data.length, 16);
  data.copy(buf, Size.OPTION_REPLY_HEADER);
  return buf;
}

/** Decodes the 20-byte reply header; returns the option, type and payload length. */
export function decodeOptionReplyHeader(
  buf: Buffer,
  at: number,
): { option: number; type: number; length: number } {
  if (buf.readBigUInt64BE(at) !== OPTION_REPLY_MAGIC) {
    throw new NbdProtocolError('ERR_NBD_BAD_MAGIC', 'bad option reply magic');
  }
  return {
    option: buf.readUInt32BE(at + 8),
    type: buf.readUInt32BE(at + 12),
    length: buf.readUInt32BE(at + 16),
  };
}

/** A bounds-checked reader over one option's data: every overrun is ERR_INVALID. */
class OptionDataReader {
  private at = 0;
  constructor(private readonly data: Buffer) {}
  private need(n: number, what: string): void {
    if (this.at + n > this.data.length) {
      throw new NbdProtocolError('ERR_NBD_INVALID_OPTION', `option data too short for ${what}`);
    }
  }
  u16(what: string): number {
    this.need(2, what);
    const v = this.data.readUInt16BE(this.at);
    this.at += 2;
    return v;
  }
  u32(what: string): number {
    this.need(4, what);
    const v = this.data.readUInt32BE(this.at);
    this.at += 4;
    return v;
  }
  string(length: number, what: string): string {
    if (length > MAX_STRING) {
      throw new NbdProtocolError('ERR_NBD_TOO_BIG', `${what} of ${length} bytes exceeds ${MAX_STRING}`);
    }
    this.need(length, what);
    const s = decodeString(this.data.subarray(this.at, this.at + length), what);
    this.at += length;
    return s;
  }
  end(what: string): void {
    if (this.at !== this.data.length) {
      throw new NbdProtocolError(
        'ERR_NBD_INVALID_OPTION',
        `${this.data.length - this.at} trailing bytes in ${what}`,
      );
    }
  }
}

function decodeString(bytes: Buffer, what: string): string {
  const s = bytes.toString('utf8');
  if (s.includes('\0') || !Buffer.from(s, 'utf8').equals(bytes)) {
    throw new NbdProtocolError('ERR_NBD_INVALID_OPTION', `${what} is not a valid NUL-free UTF-8 string`);
  }
  return s;
}

/** NBD_OPT_EXPORT_NAME carries the bare name as its whole data. */
export function decodeExportName(data: Buffer): string {
  if (data.length > MAX_STRING) {
    throw new NbdProtocolError(
      'ERR_NBD_TOO_BIG',
      `export name of ${data.length} bytes exceeds ${MAX_STRING}`,
    );
  }
  return decodeString(data, 'export name');
}

export interface InfoRequest {
  name: string;
  requests: number[];
}

export function encodeInfoRequest(req: InfoRequest): Buffer {
  const name = Buffer.from(req.name, 'utf8');
  const buf = Buffer.allocUnsafe(4 + name.length + 2 + 2 * req.requests.length);
  buf.writeUInt32BE(name.length, 0);
  name.copy(buf, 4);
  let at = 4 + name.length;
  at = buf.writeUInt16BE(req.requests.length, at);
  for (const r of req.requests) at = buf.writeUInt16BE(r, at);
  return buf;
}

export function decodeInfoRequest(data: Buffer): InfoRequest {
  const r = new OptionDataReader(data);
  const name = r.string(r.u32('export name length'), 'export name');
  const count = r.u16('information request count');
  const requests: number[] = [];
  for (let i = 0; i < count; i++) requests.push(r.u16('information request'));
  r.end('NBD_OPT_INFO/GO');
  return { name, requests };
}

export interface MetaContextRequest {
  exportName: string;
  queries: string[];
}

export function encodeMetaContextRequest(req: MetaContextRequest): Buffer {
  const name = Buffer.from(req.exportName, 'utf8');
  const queries = req.queries.map((q) => Buffer.from(q, 'utf8'));
  const size = 4 + name.length + 4 + queries.reduce((n, q) => n + 4 + q.length, 0);
  const buf = Buffer.allocUnsafe(size);
  let at = buf.writeUInt32BE(name.length, 0);
  at += name.copy(buf, at);
  at = buf.writeUInt32BE(queries.length, at);
  for (const q of queries) {
    at = buf.writeUInt32BE(q.length, at);
    at += q.copy(buf, at);
  }
  return buf;
}

export function decodeMetaContextRequest(data: Buffer): MetaContextRequest {
  const r = new OptionDataReader(data);
  const exportName = r.string(r.u32('export name length'), 'export name');
  const count = r.u32('query count');
  const queries: string[] = [];
  for (let i = 0; i < count; i++) queries.push(r.string(r.u32('query length'), 'query'));
  r.end('meta context request');
  return { exportName, queries };
}

/** Payload of an NBD_REP_SERVER reply to NBD_OPT_LIST: the name, then a free-form description. */
export function encodeServerEntry(name: string, description = ''): Buffer {
  const n = Buffer.from(name, 'utf8');
  const d = Buffer.from(description, 'utf8');
  const buf = Buffer.allocUnsafe(4 + n.length + d.length);
  buf.writeUInt32BE(n.length, 0);
  n.copy(buf, 4);
  d.copy(buf, 4 + n.length);
  return buf;
}

export function decodeServerEntry(data: Buffer): { name: string; description: string } {
  const r = new OptionDataReader(data);
  const name = r.string(r.u32('name length'), 'export name');
  return { name, description: data.toString('utf8', 4 + Buffer.byteLength(name)) };
}

/** Payload of an NBD_REP_META_CONTEXT reply: context id, then its name. */
export function encodeMetaContextReply(id: number, name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const buf = Buffer.allocUnsafe(4 + n.length);
  buf.writeUInt32BE(id, 0);
  n.copy(buf, 4);
  return buf;
}

export function decodeMetaContextReply(data: Buffer): { id: number; name: string } {
  return { id: data.readUInt32BE(0), name: data.toString('utf8', 4) };
}

export type InfoPayload =
  | { type: typeof Info.EXPORT; size: number; flags: number }
  | { type: typeof Info.NAME; name: string }
  | { type: typeof Info.DESCRIPTION; description: string }
  | { type: typeof Info.BLOCK_SIZE; minimum: number; preferred: number; maximum: number };

export function encodeInfo(p: InfoPayload): Buffer {
  switch (p.type) {
    case Info.EXPORT: {
      const buf = Buffer.allocUnsafe(12);
      buf.writeUInt16BE(p.type, 0);
      writeU64(buf, 2, p.size);
      buf.writeUInt16BE(p.flags, 10);
      return buf;
    }
    case Info.NAME:
    case Info.DESCRIPTION: {
      const s = Buffer.from(p.type === Info.NAME ? p.name : p.description, 'utf8');
      const buf = Buffer.allocUnsafe(2 + s.length);
      buf.writeUInt16BE(p.type, 0);
      s.copy(buf, 2);
      return buf;
    }
    case Info.BLOCK_SIZE: {
      const buf = Buffer.allocUnsafe(14);
      buf.writeUInt16BE(p.type, 0);
      buf.writeUInt32BE(p.minimum, 2);
      buf.writeUInt32BE(p.preferred, 6);
      buf.writeUInt32BE(p.maximum, 10);
      return buf;
    }
  }
}

export function decodeInfo(data: Buffer): InfoPayload | { type: number; unknown: Buffer } {
  const type = data.readUInt16BE(0);
  switch (type) {
    case Info.EXPORT:
      return { type, size: readU64(data, 2), flags: data.readUInt16BE(10) };
    case Info.NAME:
      return { type, name: data.toString('utf8', 2) };
    case Info.DESCRIPTION:
      return { type, description: data.toString('utf8', 2) };
    case Info.BLOCK_SIZE:
      return {
        type,
        minimum: data.readUInt32BE(2),
        preferred: data.readUInt32BE(6),
        maximum: data.readUInt32BE(10),
      };
    default:
      return { type, unknown: data.subarray(2) };
  }
}

/** The reply that ends a successful NBD_OPT_EXPORT_NAME: size, flags, and zeroes unless NO_ZEROES. */
export function encodeExportNameReply(size: number, flags: number, noZeroes: boolean): Buffer {
  const buf = Buffer.alloc(Size.EXPORT_NAME_REPLY + (noZeroes ? 0 : Size.EXPORT_NAME_ZEROES));
  writeU64(buf, 0, size);
  buf.writeUInt16BE(flags, 8);
  return buf;
}
