// The layout of a batch of blocks in a SharedArrayBuffer slab, shared by the
// store and its encoding pool: the blocks, then one packed slot per block
// (lz4 output), the blocks' hashes, and what each slot holds. The pool writes
// its results into the slab itself, so a batch costs one small message each
// way whatever its size.

import { BLOCK } from './layout';

export const HASH_BYTES = 16;

/** lengths[i] for a block of zeroes: neither hashed nor packed. */
export const PACKED_ZERO = 0;
/** lengths[i] when lz4 gains nothing: the block is stored raw. */
export const PACKED_RAW = -1;

export function slabBytes(capacity: number): number {
  return capacity * (2 * BLOCK + HASH_BYTES + 4);
}

/** What a pool worker is asked to do with a slab. */
export interface BatchTask {
  slab: SharedArrayBuffer;
  /** Blocks the slab has room for (its layout). */
  capacity: number;
  /** Blocks in this batch, from the start. */
  count: number;
}

export class BatchView {
  readonly blocks: Buffer;
  readonly packed: Buffer;
  readonly hashes: Buffer;
  /** Per block: lz4 length, PACKED_RAW or PACKED_ZERO. */
  readonly lengths: Int32Array;

  constructor(
    readonly slab: SharedArrayBuffer,
    readonly capacity: number,
  ) {
    const data = capacity * BLOCK;
    this.blocks = Buffer.from(slab, 0, data);
    this.packed = Buffer.from(slab, data, data);
    this.hashes = Buffer.from(slab, 2 * data, capacity * HASH_BYTES);
    this.lengths = new Int32Array(slab, 2 * data + capacity * HASH_BYTES, capacity);
  }

  block(i: number): Buffer {
    return this.blocks.subarray(i * BLOCK, (i + 1) * BLOCK);
  }

  /** The slot lz4 output for block i goes to: one byte short of a block, so output that gains nothing does not fit. */
  slot(i: number): Buffer {
    return this.packed.subarray(i * BLOCK, (i + 1) * BLOCK - 1);
  }

  hash(i: number): Buffer {
    return this.hashes.subarray(i * HASH_BYTES, (i + 1) * HASH_BYTES);
  }
}
