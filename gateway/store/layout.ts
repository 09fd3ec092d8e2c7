// On-disk formats of the dedup store: index keys and values (LMDB) and the
// records of the append-only segment files. All integers big-endian, so
// index keys sort by volume, then block.

export const BLOCK = 4096;
export const BLOCK_SHIFT = 12;

/** Metamap value for a block written as zeroes: never stored, reads as zeroes. */
export const ZERO_BLOCK = 0;

/**
 * Metamap value of a linked volume's block that reads as a hole although its
 * parent (a snapshot it falls through to) maps the block. Never a block id:
 * ids count up from 1 and never get near 2^53.
 */
export const MASK_BLOCK = Number.MAX_SAFE_INTEGER;

const TWO_32 = 2 ** 32;

// ---- metamap: (volume id, logical block) -> block id -------------------------------

/** In-memory key of a metamap entry: volume id and block packed into one exact number. */
export function metaKey(volume: number, lba: number): number {
  return volume * 2 ** 40 + lba;
}

export function metaKeyVolume(key: number): number {
  return Math.floor(key / 2 ** 40);
}

export function metaKeyLba(key: number): number {
  return key % 2 ** 40;
}

export function encodeMetaKey(volume: number, lba: number): Buffer {
  return encodeMetaKeyInto(volume, lba, Buffer.allocUnsafe(12));
}

/** encodeMetaKey into a caller's 12-byte buffer (lookups reuse one key buffer). */
export function encodeMetaKeyInto(volume: number, lba: number, b: Buffer): Buffer {
  b.writeUInt32BE(volume, 0);
  b.writeUInt32BE(Math.floor(lba / TWO_32), 4);
  b.writeUInt32BE(lba % TWO_32, 8);
  return b;
}

export function decodeMetaKey(b: Buffer): { volume: number; lba: number } {
  return { volume: b.readUInt32BE(0), lba: b.readUInt32BE(4) * TWO_32 + b.readUInt32BE(8) };
}

export function encodeId(id: number): Buffer {
  return encodeIdInto(id, Buffer.allocUnsafe(8));
}

/** encodeId into a caller's 8-byte buffer. */
export function encodeIdInto(id: number, b: Buffer): Buffer {
  b.writeUInt32BE(Math.floor(id / TWO_32), 0);
  b.writeUInt32BE(id % TWO_32, 4);
  return b;
}

export function decodeId(b: Buffer): number {
  return b.readUInt32BE(0) * TWO_32 + b.readUInt32BE(4);
}

// ---- datamap: block id -> where its bytes are, its references, its hash -------------

export const RecordFlag = { LZ4: 1 } as const;

/**
 * Flags only a datamap entry carries, above the record's own. DAMAGED: a scrub found the
 * stored bytes failing their content id; the block stays readable as EIO, but is never
 * offered by its content id again (not after a restart either), so a mirrored batch or a
 * write naming that content stores a new copy.
 */
export const EntryFlag = { DAMAGED: 0x8000 } as const;

export interface DataEntry {
  segment: number;
  /** Offset of the record header in the segment file. */
  offset: number;
  /** Payload bytes after the header (compressed or raw). */
  storedLength: number;
  flags: number;
  refcount: number;
  /** Keyed XXH3-128 of the block's 4 KiB. */
  hash: Buffer;
}

/** Bytes of an encoded entry. */
export const DATA_ENTRY = 36;

export function decodeDataEntry(b: Buffer): DataEntry {
  if (b.length !== DATA_ENTRY) throw new Error(`datamap entry of ${b.length} bytes`);
  return decodeDataEntryAt(b, 0);
}

/** The entry at b[at..at+DATA_ENTRY] (within a datamap page). */
export function decodeDataEntryAt(b: Buffer, at: number): DataEntry {
  return {
    segment: b.readUInt32BE(at),
    offset: b.readUInt32BE(at + 4),
    storedLength: b.readUInt32BE(at + 8),
    flags: b.readUInt16BE(at + 12),
    refcount: b.readUInt32BE(at + 16),
    hash: Buffer.from(b.subarray(at + 20, at + 36)),
  };
}

// ---- segment records ------------------------------------------------------------------

export const RECORD_MAGIC = 0x42475231; // "BGR1"
export const RECORD_HEADER = 40;

export interface RecordHeader {
  flags: number;
  blockId: number;
  storedLength: number;
  hash: Buffer;
}

/** Writes a record header; the payload follows it. */
export function encodeRecordHeader(h: RecordHeader, b: Buffer, at: number): void {
  b.writeUInt32BE(RECORD_MAGIC, at);
  b.writeUInt16BE(h.flags, at + 4);
  b.writeUInt16BE(0, at + 6);
  b.writeUInt32BE(Math.floor(h.blockId / TWO_32), at + 8);
  b.writeUInt32BE(h.blockId % TWO_32, at + 12);
  b.writeUInt32BE(h.storedLength, at + 16);
  b.writeUInt32BE(0, at + 20);
  h.hash.copy(b, at + 24);
}

export function decodeRecordHeader(b: Buffer, at: number): RecordHeader | null {
  if (b.length - at < RECORD_HEADER || b.readUInt32BE(at) !== RECORD_MAGIC) return null;
  return {
    flags: b.readUInt16BE(at + 4),
    blockId: b.readUInt32BE(at + 8) * TWO_32 + b.readUInt32BE(at + 12),
    storedLength: b.readUInt32BE(at + 16),
    hash: b.subarray(at + 24, at + 40),
  };
}

export function segmentFileName(n: number): string {
  return `${String(n).padStart(8, '0')}.seg`;
}
