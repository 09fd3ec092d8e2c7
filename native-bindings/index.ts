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
  /** posix_fadvise(WILLNEED): asks the kernel to read a range ahead. */
  willNeed(fd: number, offset: number, length: number): void;
  blockDeviceSize(fd: number): number;
  peerCredentials(fd: number): { pid: number; uid: number; gid: number };
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
