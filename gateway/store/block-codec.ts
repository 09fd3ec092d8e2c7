// What happens to a block's bytes on the way into and out of a segment:
// keyed hashing, zero detection, lz4 (kept only where it gains), and the
// checks on the way out that catch a corrupted segment.

import { native } from '../../native-bindings';
import { BLOCK, RECORD_HEADER, RECORD_MAGIC, RecordFlag, encodeRecordHeader } from './layout';

const ZEROES = Buffer.alloc(BLOCK);

export function isZeroBlock(block: Buffer): boolean {
  return block.equals(ZEROES);
}

/**
 * XXH3-128 keyed with the store's secret: a fast hint that two blocks may be
 * equal, which nobody without the secret can aim collisions at. A match is
 * still compared byte for byte before a block is shared.
 *
 * Computed by the native addon, bit for bit what xxhash-addon's XXHash128
 * gives (test/unit/xxh3.test.ts holds it to that): its digest() allocates a
 * buffer per call, about 1 us of a 4 KiB block's 1.2 us here; ours writes
 * in place in about 0.25 us.
 */
export class BlockHasher {
  private readonly scratch = Buffer.alloc(16);
  constructor(private readonly secret: Buffer) {}
  hash(block: Buffer): Buffer {
    const out = Buffer.allocUnsafe(16);
    native.hash128Into(this.secret, block, out, 0);
    return out;
  }
  /** The hash written into out[at..at+16]. */
  hashInto(block: Buffer, out: Buffer, at: number): void {
    native.hash128Into(this.secret, block, out, at);
  }
  /** Hashes of each 4 KiB block of `data`, 16 bytes each, into `out`. */
  hashBlocks(data: Buffer, out: Buffer): void {
    native.hashBlocks(this.secret, data, BLOCK, out);
  }
  /** native.decodeRecord with this hasher's secret: 0, or what is wrong with the record. */
  decode(
    rec: Buffer,
    recAt: number,
    out: Buffer,
    outAt: number,
    blockId: number,
    expected: Buffer,
    expectedAt: number,
  ): number {
    return native.decodeRecord(this.secret, rec, recAt, out, outAt, blockId, expected, expectedAt);
  }
  /**
   * native.decodeRecords with this hasher's secret, on the libuv pool; with `from`, `rec`
   * is first read from that file at that offset in the same job.
   */
  decodeMany(
    rec: Buffer,
    items: Float64Array,
    hashes: Buffer,
    out: Buffer,
    status: Int32Array,
    from?: { fd: number; offset: number },
  ): Promise<void> {
    if (!from) return native.decodeRecords(this.secret, rec, items, hashes, out, status);
    return native.decodeRecords(this.secret, rec, items, hashes, out, status, from.fd, from.offset);
  }
  /** Whether `block` hashes to the 16 bytes at expected[at..]. */
  matches(block: Buffer, expected: Buffer, at = 0): boolean {
    native.hash128Into(this.secret, block, this.scratch, 0);
    return this.scratch.compare(expected, at, at + 16) === 0;
  }
}

/**
 * A whole segment record (header and payload), compressed when lz4 gains.
 * LZ4 block format, from the native addon: lz4-napi measured 9-14 us to compress
 * and 3-4 us to decompress a 4 KiB block here, the addon 2 us and 0.1 us.
 */
export function encodeRecord(blockId: number, block: Buffer, hash: Buffer): Buffer {
  const rec = Buffer.allocUnsafe(RECORD_HEADER + block.length);
  return rec.subarray(0, encodeRecordInto(blockId, block, hash, rec, 0));
}

/** Encodes a block's record into `out` at `at` (room for header + 4 KiB); returns its length. */
export function encodeRecordInto(
  blockId: number,
  block: Buffer,
  hash: Buffer,
  out: Buffer,
  at: number,
): number {
  const payloadAt = at + RECORD_HEADER;
  const packed = native.lz4Compress(block, out.subarray(payloadAt, payloadAt + block.length - 1));
  const useLz4 = packed > 0;
  if (!useLz4) block.copy(out, payloadAt);
  const storedLength = useLz4 ? packed : block.length;
  encodeRecordHeader({ flags: useLz4 ? RecordFlag.LZ4 : 0, blockId, storedLength, hash }, out, at);
  return RECORD_HEADER + storedLength;
}

/**
 * A record from a payload packed elsewhere (the encoding pool): lz4 output, or
 * the raw block when `lz4` is false. Returns its length.
 */
export function writeRecordInto(
  blockId: number,
  hash: Buffer,
  payload: Buffer,
  lz4: boolean,
  out: Buffer,
  at: number,
): number {
  payload.copy(out, at + RECORD_HEADER);
  encodeRecordHeader(
    { flags: lz4 ? RecordFlag.LZ4 : 0, blockId, storedLength: payload.length, hash },
    out,
    at,
  );
  return RECORD_HEADER + payload.length;
}

export class CorruptBlockError extends Error {
  readonly code = 'ERR_CORRUPT_BLOCK';
}

/**
 * The block's 4 KiB from a record, into `out`, after checking that the record
 * is the one the index expects. The contents are not hash-checked: callers
 * that compare them with a block in hand need no hash, the others call
 * decodeRecordInto.
 */
export function unpackRecordInto(rec: Buffer, blockId: number, out: Buffer): void {
  if (rec.length < RECORD_HEADER || rec.readUInt32BE(0) !== RECORD_MAGIC)
    throw new CorruptBlockError(`block ${blockId}: no record header where the index points`);
  const found = rec.readUInt32BE(8) * 2 ** 32 + rec.readUInt32BE(12);
  if (found !== blockId) throw new CorruptBlockError(`block ${blockId}: found the record of block ${found}`);
  const storedLength = rec.readUInt32BE(16);
  const payload = rec.subarray(RECORD_HEADER, RECORD_HEADER + storedLength);
  if (rec.readUInt16BE(4) & RecordFlag.LZ4) {
    if (native.lz4Decompress(payload, out) !== BLOCK) {
      throw new CorruptBlockError(`block ${blockId}: lz4 payload does not decode to a block`);
    }
  } else if (payload.length === BLOCK) {
    payload.copy(out);
  } else {
    throw new CorruptBlockError(`block ${blockId}: raw payload of ${payload.length} bytes`);
  }
}

/**
 * Decodes a record straight into `out` (4 KiB) and checks that its bytes hash
 * as recorded (the 16 bytes of `hash` from `hashAt`): the reply buffer is filled
 * in place, no allocation per block.
 */
export function decodeRecordInto(
  rec: Buffer,
  blockId: number,
  hash: Buffer,
  hasher: BlockHasher,
  out: Buffer,
  hashAt = 0,
): void {
  decodeRecordAt(rec, 0, blockId, hash, hashAt, hasher, out, 0);
}

/**
 * decodeRecordInto for the record at rec[recAt..] into out[outAt..], in one native
 * call: a 1 MiB read decodes 256 records, and a subarray per record and per block
 * cost as much as the decoding.
 */
export function decodeRecordAt(
  rec: Buffer,
  recAt: number,
  blockId: number,
  hash: Buffer,
  hashAt: number,
  hasher: BlockHasher,
  out: Buffer,
  outAt: number,
): void {
  const status = hasher.decode(rec, recAt, out, outAt, blockId, hash, hashAt);
  if (status !== 0) throw decodeError(status, blockId, rec, recAt);
}

/** The error for a record that decodeRecords (or decodeRecord) answered `status` for. */
export function decodeError(status: number, blockId: number, rec: Buffer, recAt: number): CorruptBlockError {
  return new CorruptBlockError(`block ${blockId}: ${decodeFailure(status, rec, recAt)}`);
}

function decodeFailure(status: number, rec: Buffer, recAt: number): string {
  switch (status) {
    case 1:
      return 'no record header where the index points';
    case 2:
      return `found the record of block ${rec.readUInt32BE(recAt + 8) * 2 ** 32 + rec.readUInt32BE(recAt + 12)}`;
    case 3:
      return 'the payload does not decode to a block';
    default:
      return 'contents fail the hash check';
  }
}

/** decodeRecordInto a new buffer. */
export function decodeRecord(rec: Buffer, blockId: number, hash: Buffer, hasher: BlockHasher): Buffer {
  const block = Buffer.allocUnsafe(BLOCK);
  decodeRecordInto(rec, blockId, hash, hasher, block);
  return block;
}

/**
 * A stored payload as it travels (mirror links, seed bundles) back to its 4 KiB.
 * Only what this store would have written is accepted: raw is exactly a block,
 * and lz4 is shorter (a block lz4 cannot shrink is stored raw). Throws
 * CorruptBlockError with the reason; the content-id check is the caller's. An lz4
 * payload decodes into `out` (4 KiB) when given; a raw one is returned as it is.
 */
export function unpackPayload(lz4: boolean, payload: Buffer, out?: Buffer): Buffer {
  if (!lz4) {
    if (payload.length !== BLOCK) throw new CorruptBlockError(`raw block of ${payload.length} bytes`);
    return payload;
  }
  if (payload.length >= BLOCK) throw new CorruptBlockError(`lz4 block of ${payload.length} bytes`);
  out ??= Buffer.allocUnsafe(BLOCK);
  if (native.lz4Decompress(payload, out) !== BLOCK)
    throw new CorruptBlockError('lz4 payload does not decode to 4 KiB');
  return out;
}

/** A record's stored payload and whether it is lz4, as it travels (a view, not a copy). */
export function recordPayload(rec: Buffer): { lz4: boolean; payload: Buffer } {
  const storedLength = rec.readUInt32BE(16);
  return {
    lz4: (rec.readUInt16BE(4) & RecordFlag.LZ4) !== 0,
    payload: rec.subarray(RECORD_HEADER, RECORD_HEADER + storedLength),
  };
}
