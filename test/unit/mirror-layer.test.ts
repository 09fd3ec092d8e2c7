// The write splitter against a scripted device, store and mirror: when a write is
// captured for the replicas (as soon as the device says it applied, else at its
// completion), when the client is answered, and what a failure leaves behind.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type { BlockDevice, WriteFlags } from '../../gateway/device/block-device';
import { BlockError } from '../../gateway/device/errors';
import { MemoryDevice } from '../../gateway/device/memory';
import { MirrorLayer } from '../../gateway/replication/mirror-layer';
import type { Mirror } from '../../gateway/replication/mirror';
import type { CapturedRange, DedupStore } from '../../gateway/store/dedup-store';

/** A device whose writes finish when the test says, and may say they applied first. */
class ScriptedDevice extends MemoryDevice {
  pending: Array<{ applied?: () => void; finish: (err?: Error) => void }> = [];
  override write(_offset: number, _data: Buffer, flags?: WriteFlags): Promise<void> {
    return new Promise((resolve, reject) =>
      this.pending.push({ applied: flags?.applied, finish: (err) => (err ? reject(err) : resolve()) }),
    );
  }
}

interface Recorder {
  events: string[];
  dirty: Array<[number, number]>;
  ack: () => void;
}

/** A sync mirror that records captures and dirty ranges, and acknowledges when told. */
function scriptedMirror(rec: Recorder): Mirror {
  return {
    answer: null,
    activate: () => ({ ready: null, release: () => undefined }),
    captured: (range: CapturedRange) => {
      rec.events.push(`captured ${range.lba}`);
      return new Promise<void>((resolve) => (rec.ack = resolve));
    },
    markDirty: (lba: number, count: number) => rec.dirty.push([lba, count]),
  } as unknown as Mirror;
}

function setup(): { dev: ScriptedDevice; layer: MirrorLayer; rec: Recorder } {
  const dev = new ScriptedDevice(1 << 20);
  const rec: Recorder = { events: [], dirty: [], ack: () => undefined };
  const store = {
    captureRange: (_v: number, lba: number, count: number) => ({
      lba,
      kinds: Buffer.alloc(count),
      cids: Buffer.alloc(0),
      sources: [],
    }),
  } as unknown as DedupStore;
  const mirror = scriptedMirror(rec);
  const layer = new MirrorLayer(
    dev as BlockDevice,
    store,
    1,
    () => [mirror],
    () => null,
  );
  return { dev, layer, rec };
}

const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

describe('mirror layer (write splitter)', () => {
  it('captures a write when the device says it applied, before the local write completes', async () => {
    const { dev, layer, rec } = setup();
    const write = layer.write(8192, Buffer.alloc(4096));
    await tick();
    dev.pending[0]!.applied!();
    assert.deepEqual(rec.events, ['captured 2']);
    dev.pending[0]!.finish();
    rec.ack();
    await write;
  });

  it('captures at completion a write whose device never says it applied', async () => {
    const { dev, layer, rec } = setup();
    const write = layer.write(0, Buffer.alloc(4096));
    await tick();
    assert.deepEqual(rec.events, []);
    dev.pending[0]!.finish();
    await tick();
    assert.deepEqual(rec.events, ['captured 0']);
    rec.ack();
    await write;
  });

  it('answers a sync write only once both the local write and the replica are done', async () => {
    const { dev, layer, rec } = setup();
    let answered = false;
    const write = layer.write(0, Buffer.alloc(4096)).then(() => (answered = true));
    await tick();
    dev.pending[0]!.applied!();
    rec.ack();
    await tick();
    assert.equal(answered, false, 'answered before the local write completed');
    dev.pending[0]!.finish();
    await write;
    assert.equal(answered, true);
  });

  it('waits for the replica after the local write completes', async () => {
    const { dev, layer, rec } = setup();
    let answered = false;
    const write = layer.write(0, Buffer.alloc(4096)).then(() => (answered = true));
    await tick();
    dev.pending[0]!.applied!();
    dev.pending[0]!.finish();
    await tick();
    assert.equal(answered, false, 'answered before the replica acknowledged');
    rec.ack();
    await write;
  });

  it('marks the range dirty, and fails the write, when the local write fails after its early capture', async () => {
    const { dev, layer, rec } = setup();
    const write = layer.write(4096 * 5, Buffer.alloc(8192));
    await tick();
    dev.pending[0]!.applied!();
    dev.pending[0]!.finish(new BlockError('EIO', 'disk gone'));
    await assert.rejects(write, /disk gone/);
    assert.deepEqual(rec.events, ['captured 5']);
    assert.deepEqual(rec.dirty, [[5, 2]]);
  });

  it('captures once when the device says it applied twice', async () => {
    const { dev, layer, rec } = setup();
    const write = layer.write(0, Buffer.alloc(4096));
    await tick();
    dev.pending[0]!.applied!();
    dev.pending[0]!.applied!();
    dev.pending[0]!.finish();
    rec.ack();
    await write;
    assert.deepEqual(rec.events, ['captured 0']);
  });
});
