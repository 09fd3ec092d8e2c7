import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import fc from 'fast-check';
import { BlockDevice, ExtentFlag } from '../../gateway/device/block-device';
import { MemoryDevice } from '../../gateway/device/memory';
import { RawDevice } from '../../gateway/device/raw';
import { ReadOnlyLayer } from '../../gateway/device/read-only';
import { DedupDevice } from '../../gateway/store/dedup-device';
import { DedupStore } from '../../gateway/store/dedup-store';
import { silentLogger } from '../../gateway/util/log';

const SIZE = 256 * 1024;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-dev-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

type Op =
  | { kind: 'write'; offset: number; data: Buffer }
  | { kind: 'trim' | 'zero' | 'zeroNoHole'; offset: number; length: number };

const range = fc
  .tuple(fc.nat({ max: SIZE - 1 }), fc.integer({ min: 1, max: 80 * 1024 }))
  .map(([offset, length]) => ({ offset, length: Math.min(length, SIZE - offset) }));

const opArb: fc.Arbitrary<Op> = fc.oneof(
  fc
    .tuple(range, fc.integer({ min: 0, max: 255 }))
    .map(([r, byte]) => ({ kind: 'write' as const, offset: r.offset, data: Buffer.alloc(r.length, byte) })),
  fc
    .tuple(fc.constantFrom('trim' as const, 'zero' as const, 'zeroNoHole' as const), range)
    .map(([kind, r]) => ({
      kind,
      ...r,
    })),
);

async function apply(dev: BlockDevice, model: Buffer, op: Op): Promise<void> {
  if (op.kind === 'write') {
    await dev.write(op.offset, op.data);
    op.data.copy(model, op.offset);
  } else if (op.kind === 'trim') {
    await dev.trim(op.offset, op.length);
    model.fill(0, op.offset, op.offset + op.length);
  } else {
    await dev.writeZeroes(op.offset, op.length, { noHole: op.kind === 'zeroNoHole' });
    model.fill(0, op.offset, op.offset + op.length);
  }
}

function behavesLikeADisk(make: () => BlockDevice): void {
  it('reads back what a random sequence of writes, trims and zeroes left', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(opArb, { maxLength: 12 }), async (ops) => {
        const dev = make();
        const model = Buffer.alloc(SIZE);
        try {
          for (const op of ops) await apply(dev, model, op);
          const got = Buffer.alloc(SIZE);
          await dev.read(0, got);
          assert.ok(got.equals(model));
        } finally {
          await dev.close();
        }
      }),
      { numRuns: 40 },
    );
  });

  it('reports block status extents that cover the request, with zeroes only where zero', async () => {
    const dev = make();
    try {
      await dev.write(64 * 1024, Buffer.alloc(64 * 1024, 1));
      const extents = await dev.blockStatus(0, SIZE);
      assert.equal(
        extents.reduce((n, e) => n + e.length, 0),
        SIZE,
      );
      let at = 0;
      for (const e of extents) {
        if (e.flags & ExtentFlag.ZERO) {
          const buf = Buffer.alloc(e.length);
          await dev.read(at, buf);
          assert.ok(
            buf.every((b) => b === 0),
            `extent at ${at} claims zero`,
          );
        }
        at += e.length;
      }
      assert.equal(extents[0]!.flags, ExtentFlag.HOLE | ExtentFlag.ZERO);
    } finally {
      await dev.close();
    }
  });
}

let n = 0;
describe('memory device', () => behavesLikeADisk(() => new MemoryDevice(SIZE)));
describe('raw device', () => {
  behavesLikeADisk(() => RawDevice.open({ path: path.join(tmp, `raw${n++}.img`), size: SIZE }));

  it('punches a hole for TRIM so the file frees the space', async () => {
    const file = path.join(tmp, 'punch.img');
    const dev = RawDevice.open({ path: file, size: SIZE });
    await dev.write(0, Buffer.alloc(SIZE, 7));
    await dev.flush();
    const before = fs.statSync(file).blocks;
    await dev.trim(0, SIZE);
    assert.ok(fs.statSync(file).blocks < before);
    assert.deepEqual(await dev.blockStatus(0, SIZE), [
      { length: SIZE, flags: ExtentFlag.HOLE | ExtentFlag.ZERO },
    ]);
    await dev.close();
  });

  it('keeps zeroed ranges allocated when asked for NO_HOLE', async () => {
    const file = path.join(tmp, 'nohole.img');
    const dev = RawDevice.open({ path: file, size: SIZE });
    await dev.write(0, Buffer.alloc(SIZE, 7));
    await dev.flush();
    const before = fs.statSync(file).blocks;
    await dev.writeZeroes(0, SIZE, { noHole: true });
    assert.equal(fs.statSync(file).blocks, before);
    const got = Buffer.alloc(SIZE, 1);
    await dev.read(0, got);
    assert.ok(got.every((b) => b === 0));
    await dev.close();
  });

  it('grows and shrinks its file on resize', async () => {
    const file = path.join(tmp, 'resize.img');
    const dev = RawDevice.open({ path: file, size: SIZE });
    await dev.resize(SIZE * 2);
    assert.equal(fs.statSync(file).size, SIZE * 2);
    assert.equal(dev.size, SIZE * 2);
    await dev.close();
  });
});

describe('dedup device', () => {
  behavesLikeADisk(() => {
    const store = DedupStore.open(path.join(tmp, `dedup${n++}`), silentLogger);
    const dev = new DedupDevice(store, store.volumeId('v'), SIZE);
    // The device is one volume of a shared store; closing it here closes its store too.
    const close = dev.close.bind(dev);
    dev.close = async () => {
      await close();
      await store.close();
    };
    return dev;
  });
});

describe('read-only layer', () => {
  it('refuses writes, trims and zeroes with EPERM and passes reads through', async () => {
    const inner = new MemoryDevice(SIZE);
    await inner.write(0, Buffer.alloc(16, 9));
    const dev = new ReadOnlyLayer(inner);
    await assert.rejects(dev.write(0, Buffer.alloc(1)), { code: 'EPERM' });
    await assert.rejects(dev.trim(0, 1), { code: 'EPERM' });
    await assert.rejects(dev.writeZeroes(0, 1), { code: 'EPERM' });
    const got = Buffer.alloc(16);
    await dev.read(0, got);
    assert.ok(got.every((b) => b === 9));
    assert.equal(dev.capabilities().readOnly, true);
  });
});
