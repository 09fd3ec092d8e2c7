// Typed access to the N-API addon built from blockgate_native.c by node-gyp
// during `npm ci`.

import path from 'node:path';

export interface NativeBindings {
  /** fallocate(2) on the libuv pool. Rejects with an Error carrying `code` (e.g. EOPNOTSUPP). */
  fallocate(fd: number, mode: number, offset: number, length: number): Promise<void>;
  /** lseek(2) with SEEK_DATA/SEEK_HOLE; -1 where no data follows (ENXIO). */
  seek(fd: number, offset: number, whence: number): number;
  /** preadv2(RWF_NOWAIT): bytes read, or -1 if it would block (not cached). */
  readNoWait(fd: number, buf: Buffer, offset: number): number;
  /** pwritev2(RWF_NOWAIT): bytes written, or -1 if it would block. */
  writeNoWait(fd: number, buf: Buffer, offset: number): number;
  /**
   * pread/pwrite of many buffers in one thread-pool job. Resolves with one errno per
   * item (0 = transferred in full; reads past end of file are zero-filled).
   */
  ioBatch(fd: number, write: boolean, buffers: Buffer[], offsets: number[]): Promise<Int32Array>;
  /** LZ4 block compression into `dst`: the compressed length, or -1 if it does not fit. */
  lz4Compress(src: Buffer, dst: Buffer): number;
  /** LZ4 block decompression into `dst`: the decompressed length, or -1 for a malformed payload. */
  lz4Decompress(src: Buffer, dst: Buffer): number;
  /**
   * Keyed XXH3-128 of `data` (XXH3_128bits_withSecret, seed 0) written as its 16-byte canonical form
   * (high 64 bits then low 64 bits, big-endian) at `out[outOffset, outOffset + 16)`. Bit for bit the
   * digest of xxhash-addon's `new XXHash128(secret)` after `reset(); update(data)`, without allocating.
   * Throws RangeError if `secret` is shorter than 136 bytes or the 16 bytes do not fit in `out` at an
   * integer `outOffset`; TypeError for arguments of the wrong type.
   */
  hash128Into(secret: Buffer, data: Buffer, out: Buffer, outOffset: number): void;
  /**
   * {@link NativeBindings.hash128Into} for every consecutive `blockSize`-byte slice of `data`: hash `i`
   * goes to `out[16 * i, 16 * i + 16)`. Views over a SharedArrayBuffer are accepted (worker pools hash
   * shared slabs; nothing may write `data` meanwhile). Throws RangeError if `data.byteLength` is not a
   * multiple of `blockSize`, `out` holds fewer than 16 bytes per block, or `out` overlaps `data` or
   * `secret`; RangeError/TypeError as `hash128Into` for the secret and argument types.
   */
  hashBlocks(secret: Buffer, data: Buffer | Uint8Array, blockSize: number, out: Buffer | Uint8Array): void;
  /**
   * Decodes the segment record at `rec[recOffset..]` into the 4 KiB at `out[outOffset..]`
   * and checks that it is block `blockId`'s and hashes (keyed, as hash128Into) to the 16
   * bytes at `expected[expectedOffset..]`. Returns 0, or 1 (no record header), 2 (another
   * block's record), 3 (payload malformed or too long), 4 (contents fail the hash).
   */
  decodeRecord(
    secret: Buffer,
    rec: Buffer,
    recOffset: number,
    out: Buffer,
    outOffset: number,
    blockId: number,
    expected: Buffer,
    expectedOffset: number,
  ): number;
  /**
   * {@link NativeBindings.decodeRecord} for many records of `rec`, on the libuv pool.
   * `items` holds four numbers per record: its offset in `rec`, its block id, where its
   * 4 KiB go in `out`, and where its expected hash is in `hashes` (-1: the hash in the
   * record's own header). `status[k]` gets record k's code. Offsets are checked before
   * the job starts (RangeError); nothing may touch the arguments until it settles.
   * With `fd` and `fileOffset`, the job first reads all of `rec` from that file; a failed
   * read rejects with an Error carrying `code`, and bytes past the end of the file read
   * as zeroes (the records there fail their checks one by one).
   */
  decodeRecords(
    secret: Buffer,
    rec: Buffer,
    items: Float64Array,
    hashes: Buffer,
    out: Buffer,
    status: Int32Array,
    fd?: number,
    fileOffset?: number,
  ): Promise<void>;
  /**
   * Segment records (header, then lz4 or raw payload, as encodeRecordInto makes them) for
   * some blocks of `data`, packed one after another into `out`, on the libuv pool. `items`
   * holds two numbers per record: the block's index in `data` and its block id; `hashes`
   * the 16-byte hash of every block of `data`; `lengths[k]` gets record k's length. Checked
   * before the job starts (RangeError); nothing may touch the arguments until it settles.
   */
  encodeRecords(
    data: Buffer,
    items: Float64Array,
    hashes: Buffer,
    out: Buffer,
    lengths: Int32Array,
  ): Promise<void>;
  /**
   * madvise(MADV_DONTNEED) on every mapping of the file at `path` (absolute) in this
   * process: its pages leave the process's RSS and stay in the page cache. Returns the
   * bytes of mappings advised.
   */
  dropFileMappings(path: string): number;
  /**
   * mallopt(M_MMAP_THRESHOLD, M_TRIM_THRESHOLD): allocations below the first come from
   * the heap, and the heap's free top is kept until it exceeds the second. False where
   * the C library is not glibc (nothing changes).
   */
  keepHeapMemory(mmapThreshold: number, trimThreshold: number): boolean;
  /** posix_fadvise(WILLNEED): asks the kernel to read a range ahead. */
  willNeed(fd: number, offset: number, length: number): void;
  blockDeviceSize(fd: number): number;
  peerCredentials(fd: number): { pid: number; uid: number; gid: number };
  /**
   * Asks for a socket send buffer of `bytes` (SO_SNDBUF; capped by net.core.wmem_max) and
   * returns what the socket has then (the kernel reports twice what it keeps for data).
   */
  sendBuffer(fd: number, bytes: number): number;
  /**
   * execv(path, args): this process becomes that program, with the same process id and
   * the same stdio. Returns only by throwing (an Error with `code`, e.g. ENOENT).
   */
  reexec(path: string, args: string[]): never;
  /**
   * Puts the calling thread under SCHED_BATCH (no wake-up preemption, same share of the
   * CPU), as every libuv pool thread is at its first native job; false where refused.
   * For worker threads, whose work should not preempt the event loop's thread.
   */
  throughputThread(): boolean;
  readonly FALLOC_FL_KEEP_SIZE: number;
  readonly FALLOC_FL_PUNCH_HOLE: number;
  readonly FALLOC_FL_ZERO_RANGE: number;
  readonly SEEK_DATA: number;
  readonly SEEK_HOLE: number;
}

// Compiled to dist/native-bindings/index.js; the addon lives in build/Release at the package root.
// A computed path, so require() rather than import.
// eslint-disable-next-line @typescript-eslint/no-require-imports
export const native: NativeBindings = require(
  path.join(__dirname, '..', '..', 'build', 'Release', 'blockgate_native.node'),
) as NativeBindings;
