// A thread of the store's encoding pool: zero-detects, hashes and lz4-packs
// every block of a batch, in place in the batch's shared slab.

import { workerData } from 'piscina';
import { native } from '../../native-bindings';
import { BatchTask, BatchView, PACKED_RAW, PACKED_ZERO } from './block-batch';
import { BlockHasher, isZeroBlock } from './block-codec';
import { BLOCK } from './layout';

// Batches are throughput work, as the libuv pool's jobs are (native-bindings, throughputThread).
native.throughputThread();

const hasher = new BlockHasher(Buffer.from((workerData as { secret: string }).secret, 'base64'));
const views = new WeakMap<SharedArrayBuffer, BatchView>();

export default function encodeBatch(task: BatchTask): void {
  let view = views.get(task.slab);
  if (!view) views.set(task.slab, (view = new BatchView(task.slab, task.capacity)));
  // One native call hashes the batch; zero blocks' hashes are computed and ignored.
  hasher.hashBlocks(view.blocks.subarray(0, task.count * BLOCK), view.hashes);
  for (let i = 0; i < task.count; i++) {
    const block = view.block(i);
    if (isZeroBlock(block)) {
      view.lengths[i] = PACKED_ZERO;
      continue;
    }
    const n = native.lz4Compress(block, view.slot(i));
    view.lengths[i] = n > 0 ? n : PACKED_RAW;
  }
}
