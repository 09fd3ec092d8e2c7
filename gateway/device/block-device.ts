// The one interface every volume layer implements, nbdkit-style: a backend
// at the bottom, filters stacked on top, each deciding its own capabilities
// and passing through what it does not change (see layer.ts).
//
// Offsets and lengths are validated against the export at the NBD edge, so a
// device may assume 0 <= offset and offset + length <= size.

export const ExtentFlag = { HOLE: 1, ZERO: 2 } as const;

export interface Extent {
  length: number;
  /** ExtentFlag bits; the same meaning as NBD's base:allocation. */
  flags: number;
}

export interface Capabilities {
  readOnly: boolean;
  /** FLUSH makes every completed write durable. */
  flush: boolean;
  /** A per-write durability flag is honoured (natively or by flushing). */
  fua: boolean;
  trim: boolean;
  zero: boolean;
  /** writeZeroes with fastZero either is fast or fails at once with ENOTSUP. */
  fastZero: boolean;
  cache: boolean;
  /** Every connection sees one shared state, so FLUSH on one covers all. */
  multiConn: boolean;
}

export interface WriteFlags {
  fua?: boolean;
  /**
   * Called once, synchronously, at the moment the write becomes what reads see, when a
   * device can tell that moment before the write completes (its bytes may not be on
   * their way to disk yet). A device that cannot tell never calls it; completion is then
   * that moment. Must not throw. The write splitter captures the new state here, so a
   * replica's round trip overlaps the local segment write rather than following it.
   */
  applied?: () => void;
}

export interface ZeroFlags extends WriteFlags {
  /** The range must stay allocated (NBD's NO_HOLE). */
  noHole?: boolean;
  /** Fail with ENOTSUP rather than zero slowly. */
  fastZero?: boolean;
}

export interface BlockDevice {
  readonly size: number;
  capabilities(): Capabilities;
  /** Fills `into` (whose length is the request's) with the bytes at `offset`. */
  read(offset: number, into: Buffer): Promise<void>;
  /** Writes `data`; the device must not keep a reference to it once the promise settles. */
  write(offset: number, data: Buffer, flags?: WriteFlags): Promise<void>;
  trim(offset: number, length: number, flags?: WriteFlags): Promise<void>;
  writeZeroes(offset: number, length: number, flags?: ZeroFlags): Promise<void>;
  flush(): Promise<void>;
  /** Advisory: bring the range close (page cache, a local copy). */
  cache(offset: number, length: number): Promise<void>;
  /** Extents covering a prefix of [offset, offset+length), never beyond it; at least one. */
  blockStatus(offset: number, length: number): Promise<Extent[]>;
  resize(size: number): Promise<void>;
  close(): Promise<void>;
  /**
   * Bytes the device holds for its data where only it knows (a memory device's pages);
   * absent where the volume manager finds out from the storage itself.
   */
  allocatedBytes?(): number | undefined;
}
