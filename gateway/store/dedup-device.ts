// A volume on the dedup store: cuts requests into 4 KiB blocks, does
// read-modify-write for the partial blocks at the edges, and serialises
// every change to a block so two writers into one block never lose either
// update.

import { BlockDevice, Capabilities, Extent, ExtentFlag, WriteFlags, ZeroFlags } from '../device/block-device';
import type { DedupStore, BlockState } from './dedup-store';
import { BLOCK } from './layout';
import { settleAll } from '../util/settle-all';

/** Blocks examined per BLOCK_STATUS request; the client asks again for the rest. */
const STATUS_BLOCKS = 65536;

export class DedupDevice implements BlockDevice {
  private readonly locks = new Map<number, Promise<void>>();
  /**
   * Whole-block batches in flight, each one lock over its range: a per-block entry for
   * each of a 1 MiB write's 256 blocks cost a Map that grew and shrank every request.
   */
  private readonly batches = new Set<{ first: number; end: number; done: Promise<void> }>();

  constructor(
    private readonly store: DedupStore,
    private readonly volume: number,
    private _size: number,
  ) {}

  get size(): number {
    return this._size;
  }

  capabilities(): Capabilities {
    return {
      readOnly: false,
      flush: true,
      fua: true,
      trim: true,
      zero: true,
      // Zeroing is a metamap update, faster than any write.
      fastZero: true,
      cache: true,
      multiConn: true,
    };
  }

  /** Runs `fn` once every earlier change to block `lba` has finished. */
  private withBlock<T>(lba: number, fn: () => Promise<T>): Promise<T> {
    // A block's own lock, when it has one, was taken after any batch over it.
    const prev = this.locks.get(lba) ?? this.batchOver(lba);
    const run = prev ? prev.then(fn, fn) : fn();
    const tail = run.then(
      () => undefined,
      () => undefined,
    );
    this.locks.set(lba, tail);
    void tail.then(() => {
      if (this.locks.get(lba) === tail) this.locks.delete(lba);
    });
    return run;
  }

  /** Calls `each` for every block a byte range touches: its lba, the slice inside it, and where in the range. */
  private static split(
    offset: number,
    length: number,
    each: (lba: number, inBlock: number, n: number, at: number) => Promise<void> | void,
  ): Promise<void>[] {
    const out: Promise<void>[] = [];
    for (let at = 0; at < length;) {
      const pos = offset + at;
      const lba = Math.floor(pos / BLOCK);
      const inBlock = pos - lba * BLOCK;
      const n = Math.min(BLOCK - inBlock, length - at);
      const r = each(lba, inBlock, n, at);
      if (r) out.push(r);
      at += n;
    }
    return out;
  }

  read(offset: number, into: Buffer): Promise<void> {
    // A single aligned block, the commonest read, settles without a promise chain.
    if (into.length === BLOCK && offset % BLOCK === 0)
      return this.store.readBlockInto(this.volume, offset / BLOCK, into);
    return this.readRange(offset, into);
  }

  private async readRange(offset: number, into: Buffer): Promise<void> {
    // The aligned whole blocks in the middle go through the store's batched path.
    const firstWhole = Math.ceil(offset / BLOCK);
    const endWhole = Math.floor((offset + into.length) / BLOCK);
    if (endWhole > firstWhole) {
      const head = firstWhole * BLOCK - offset;
      const whole = this.store.readBlocks(
        this.volume,
        firstWhole,
        endWhole - firstWhole,
        into.subarray(head, head + (endWhole - firstWhole) * BLOCK),
      );
      const edges: Promise<void>[] = [];
      if (head > 0) edges.push(this.readPartial(offset, into.subarray(0, head)));
      const tailStart = endWhole * BLOCK - offset;
      if (tailStart < into.length) edges.push(this.readPartial(endWhole * BLOCK, into.subarray(tailStart)));
      await settleAll([whole, ...edges]);
      return;
    }
    await this.readPartial(offset, into);
  }

  /** Reads a range one block at a time (partial blocks at the edges of a request). */
  private async readPartial(offset: number, into: Buffer): Promise<void> {
    await settleAll(
      DedupDevice.split(offset, into.length, async (lba, inBlock, n, at) => {
        const block = await this.store.readBlock(this.volume, lba);
        if (block) block.copy(into, at, inBlock, inBlock + n);
        else into.fill(0, at, at + n);
      }),
    );
  }

  async write(offset: number, data: Buffer, flags?: WriteFlags): Promise<void> {
    const firstWhole = Math.ceil(offset / BLOCK);
    const endWhole = Math.floor((offset + data.length) / BLOCK);
    if (endWhole - firstWhole > 1 && !this.anyLocked(firstWhole, endWhole)) {
      // Whole blocks with no change in flight on them: one batch through the store,
      // registered as the lock of each block so a later read-modify-write waits for it.
      const head = firstWhole * BLOCK - offset;
      const tailStart = endWhole * BLOCK - offset;
      // With edges, the request applies in parts at different times: no early `applied`.
      const whole = this.store.writeBlocks(
        this.volume,
        firstWhole,
        data.subarray(head, head + (endWhole - firstWhole) * BLOCK),
        head === 0 && tailStart === data.length ? flags?.applied : undefined,
      );
      const tail = whole.then(
        () => undefined,
        () => undefined,
      );
      const batch = { first: firstWhole, end: endWhole, done: tail };
      this.batches.add(batch);
      void tail.then(() => this.batches.delete(batch));
      const edges: Promise<void>[] = [];
      if (head > 0) edges.push(this.writePartial(offset, data.subarray(0, head)));
      if (tailStart < data.length) edges.push(this.writePartial(endWhole * BLOCK, data.subarray(tailStart)));
      await settleAll([whole, ...edges]);
    } else if (data.length === BLOCK && offset % BLOCK === 0) {
      // One whole block (a 4 KiB write): its mapping changes at one moment, which `applied` tells.
      const lba = offset / BLOCK;
      await this.withBlock(lba, () => this.store.writeBlock(this.volume, lba, data, flags?.applied));
    } else {
      await this.writePartial(offset, data);
    }
    if (flags?.fua) await this.store.flush();
  }

  private anyLocked(first: number, end: number): boolean {
    for (const b of this.batches) if (b.first < end && first < b.end) return true;
    if (this.locks.size === 0) return false;
    for (let lba = first; lba < end; lba++) if (this.locks.has(lba)) return true;
    return false;
  }

  /** The batch in flight over block `lba`, if any (batches never overlap). */
  private batchOver(lba: number): Promise<void> | undefined {
    for (const b of this.batches) if (b.first <= lba && lba < b.end) return b.done;
    return undefined;
  }

  /** Writes a range block by block, read-modify-write where a block is partly covered. */
  private async writePartial(offset: number, data: Buffer): Promise<void> {
    await settleAll(
      DedupDevice.split(offset, data.length, (lba, inBlock, n, at) =>
        this.withBlock(lba, async () => {
          if (n === BLOCK) return this.store.writeBlock(this.volume, lba, data.subarray(at, at + BLOCK));
          const block = (await this.store.readBlock(this.volume, lba)) ?? Buffer.alloc(BLOCK);
          data.copy(block, inBlock, at, at + n);
          return this.store.writeBlock(this.volume, lba, block);
        }),
      ),
    );
  }

  trim(offset: number, length: number, flags?: WriteFlags): Promise<void> {
    return this.zeroRange(offset, length, false, flags);
  }

  writeZeroes(offset: number, length: number, flags?: ZeroFlags): Promise<void> {
    return this.zeroRange(offset, length, flags?.noHole ?? false, flags);
  }

  /** Whole blocks become holes (or zero blocks for NO_HOLE); partial ones are zeroed in place. */
  private async zeroRange(
    offset: number,
    length: number,
    keepAllocated: boolean,
    flags?: WriteFlags,
  ): Promise<void> {
    await settleAll(
      DedupDevice.split(offset, length, (lba, inBlock, n) =>
        this.withBlock(lba, async () => {
          if (n === BLOCK) return this.store.discardBlock(this.volume, lba, keepAllocated);
          const block = await this.store.readBlock(this.volume, lba);
          if (!block) return; // already reads as zeroes
          block.fill(0, inBlock, inBlock + n);
          return this.store.writeBlock(this.volume, lba, block);
        }),
      ),
    );
    if (flags?.fua) await this.store.flush();
  }

  flush(): Promise<void> {
    return this.store.flush();
  }

  /** Reads the blocks and drops them: their segment pages come into the page cache. */
  async cache(offset: number, length: number): Promise<void> {
    const first = Math.floor(offset / BLOCK);
    const last = Math.floor((offset + length - 1) / BLOCK);
    for (let lba = first; lba <= last; lba += 64) {
      const reads: Promise<unknown>[] = [];
      for (let b = lba; b <= Math.min(last, lba + 63); b++) reads.push(this.store.readBlock(this.volume, b));
      await settleAll(reads);
    }
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const first = Math.floor(offset / BLOCK);
    const last = Math.min(Math.floor((offset + length - 1) / BLOCK), first + STATUS_BLOCKS - 1);
    const states = this.store.blockStates(this.volume, first, last - first + 1);
    const extents: Extent[] = [];
    let pos = offset;
    const end = Math.min(offset + length, (last + 1) * BLOCK);
    for (let i = 0; pos < end; i++) {
      const blockEnd = Math.min((first + i + 1) * BLOCK, end);
      const flags = stateFlags(states[i]!);
      const prev = extents[extents.length - 1];
      if (prev && prev.flags === flags) prev.length += blockEnd - pos;
      else extents.push({ length: blockEnd - pos, flags });
      pos = blockEnd;
    }
    return extents;
  }

  async resize(size: number): Promise<void> {
    if (size < this._size) {
      const keep = Math.ceil(size / BLOCK);
      await this.store.truncateVolume(this.volume, keep);
      // The block that straddles the new end keeps only what is inside it.
      if (size % BLOCK !== 0) {
        const lba = keep - 1;
        const block = await this.store.readBlock(this.volume, lba);
        if (block) {
          block.fill(0, size - lba * BLOCK);
          await this.store.writeBlock(this.volume, lba, block);
        }
      }
    }
    this._size = size;
  }

  /** The store is shared and outlives its volumes; nothing of its own to release. */
  async close(): Promise<void> {}
}

function stateFlags(s: BlockState): number {
  if (s === 'hole') return ExtentFlag.HOLE | ExtentFlag.ZERO;
  return s === 'zero' ? ExtentFlag.ZERO : 0;
}
