// The store's encoding pool: large writes are hashed and lz4-packed on other
// cores while the event loop goes on serving. A batch travels in a pooled
// SharedArrayBuffer slab (see block-batch.ts): one copy in, one small message
// each way, never a message per block. Small writes stay inline, where a
// worker round trip (about 25 us here) would cost more than the work.

import os from 'node:os';
import path from 'node:path';
import { Piscina } from 'piscina';
import { BatchTask, BatchView, slabBytes } from './block-batch';
import { BLOCK } from './layout';

/** Bytes of idle slabs kept for reuse: a deep queue of 1 MiB writes needs about 20 MiB. */
const SLAB_BYTES_KEPT = 64 * 1024 * 1024;

export class BlockPool {
  private readonly pool: Piscina<BatchTask, void>;
  private readonly free = new Map<number, BatchView[]>();
  private held = 0;

  constructor(secret: string, threads = Math.max(1, os.availableParallelism() - 1)) {
    this.pool = new Piscina({
      filename: path.join(__dirname, 'block-pool-worker.js'),
      workerData: { secret },
      minThreads: threads,
      maxThreads: threads,
      idleTimeout: Infinity,
    });
  }

  /** Copies `data` (whole blocks) into a slab and encodes it there. Release the view after use. */
  async encode(data: Buffer): Promise<BatchView> {
    const count = data.length / BLOCK;
    const view = this.acquire(count);
    data.copy(view.blocks);
    try {
      await this.pool.run({ slab: view.slab, capacity: view.capacity, count });
    } catch (err) {
      this.release(view);
      throw err;
    }
    return view;
  }

  private acquire(count: number): BatchView {
    const capacity = 2 ** Math.ceil(Math.log2(count));
    const view = this.free.get(capacity)?.pop();
    if (!view) return new BatchView(new SharedArrayBuffer(slabBytes(capacity)), capacity);
    this.held -= view.slab.byteLength;
    return view;
  }

  release(view: BatchView): void {
    if (this.held + view.slab.byteLength > SLAB_BYTES_KEPT) return;
    let list = this.free.get(view.capacity);
    if (!list) this.free.set(view.capacity, (list = []));
    list.push(view);
    this.held += view.slab.byteLength;
  }

  async close(): Promise<void> {
    await this.pool.destroy();
    this.free.clear();
  }
}
