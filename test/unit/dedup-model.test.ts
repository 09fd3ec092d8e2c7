// The dedup store against a reference model: random sequences of writes
// (whole and partial blocks), trims, zeroes, reads, volume deletes,
// compactions and restarts. Contents must match the model, the store must
// hold exactly one copy of each distinct non-zero block, and fsck must find
// every reference count equal to the references to it.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import fc from 'fast-check';
import { Compactor } from '../../gateway/store/compactor';
import { DedupDevice } from '../../gateway/store/dedup-device';
import { DedupStore } from '../../gateway/store/dedup-store';
import { META_PAGE_BYTES } from '../../gateway/store/meta-cache';
import { fsckStore } from '../../gateway/store/fsck';
import { silentLogger } from '../../gateway/util/log';

const BLOCKS = 24;
const SIZE = BLOCKS * 4096;
const VOLUMES = ['a', 'b'] as const;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-model-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** A few contents, so blocks are shared within and across volumes. */
function content(k: number): Buffer {
  const b = Buffer.alloc(4096);
  for (let i = 0; i < 4096; i++) b[i] = (k * 37 + (i % (k + 3))) & 0xff;
  return b;
}

type Op =
  | { kind: 'write'; vol: number; lba: number; count: number; k: number }
  | { kind: 'partial'; vol: number; offset: number; length: number; byte: number }
  | { kind: 'trim' | 'zero'; vol: number; lba: number; count: number }
  | { kind: 'delete'; vol: number }
  | { kind: 'compact' | 'restart' | 'check' };

const vol = fc.integer({ min: 0, max: VOLUMES.length - 1 });
const lbaRun = fc
  .tuple(fc.integer({ min: 0, max: BLOCKS - 1 }), fc.integer({ min: 1, max: 4 }))
  .map(([lba, count]) => ({ lba, count: Math.min(count, BLOCKS - lba) }));
const opArb: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 6,
    arbitrary: fc
      .tuple(vol, lbaRun, fc.integer({ min: 0, max: 5 }))
      .map(([v, r, k]) => ({ kind: 'write' as const, vol: v, ...r, k })),
  },
  {
    weight: 3,
    arbitrary: fc
      .tuple(
        vol,
        fc.integer({ min: 0, max: SIZE - 1 }),
        fc.integer({ min: 1, max: 6000 }),
        fc.integer({ min: 1, max: 255 }),
      )
      .map(([v, offset, length, byte]) => ({
        kind: 'partial' as const,
        vol: v,
        offset,
        length: Math.min(length, SIZE - offset),
        byte,
      })),
  },
  {
    weight: 2,
    arbitrary: fc
      .tuple(fc.constantFrom('trim' as const, 'zero' as const), vol, lbaRun)
      .map(([kind, v, r]) => ({ kind, vol: v, ...r })),
  },
  { weight: 1, arbitrary: vol.map((v) => ({ kind: 'delete' as const, vol: v })) },
  {
    weight: 1,
    arbitrary: fc.constantFrom(
      { kind: 'compact' as const },
      { kind: 'restart' as const },
      { kind: 'check' as const },
    ),
  },
);

let run = 0;

describe('dedup store against a model', () => {
  it('matches the model through writes, trims, zeroes, deletes, compactions and restarts', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(opArb, { minLength: 1, maxLength: 25 }), async (ops) => {
        const dir = path.join(tmp, `m${run++}`);
        // Runs rotate through the metamap cache off, one page (evicting between the
        // volumes at every turn) and the default.
        const opts = [{ metaCacheBytes: 0 }, { metaCacheBytes: META_PAGE_BYTES }, {}][run % 3]!;
        let store = DedupStore.open(dir, silentLogger, opts);
        let compactor = new Compactor(store, silentLogger, { intervalMs: 0 });
        let devs = VOLUMES.map((v) => new DedupDevice(store, store.volumeId(v), SIZE));
        const model = VOLUMES.map(() => Buffer.alloc(SIZE));

        const check = async (): Promise<void> => {
          for (let v = 0; v < VOLUMES.length; v++) {
            const got = Buffer.alloc(SIZE);
            await devs[v]!.read(0, got);
            assert.ok(got.equals(model[v]!), `volume ${VOLUMES[v]} differs from the model`);
          }
          const distinct = new Set<string>();
          for (const m of model) {
            for (let b = 0; b < BLOCKS; b++) {
              const blk = m.subarray(b * 4096, (b + 1) * 4096);
              if (!blk.every((x) => x === 0)) distinct.add(blk.toString('base64'));
            }
          }
          assert.equal(
            (await store.stats()).uniqueBlocks,
            distinct.size,
            'one stored copy per distinct block',
          );
        };

        try {
          for (const op of ops) {
            switch (op.kind) {
              case 'write': {
                const data = Buffer.concat(Array.from({ length: op.count }, () => content(op.k)));
                await devs[op.vol]!.write(op.lba * 4096, data);
                data.copy(model[op.vol]!, op.lba * 4096);
                break;
              }
              case 'partial':
                await devs[op.vol]!.write(op.offset, Buffer.alloc(op.length, op.byte));
                model[op.vol]!.fill(op.byte, op.offset, op.offset + op.length);
                break;
              case 'trim':
              case 'zero':
                if (op.kind === 'trim') await devs[op.vol]!.trim(op.lba * 4096, op.count * 4096);
                else await devs[op.vol]!.writeZeroes(op.lba * 4096, op.count * 4096, { noHole: true });
                model[op.vol]!.fill(0, op.lba * 4096, (op.lba + op.count) * 4096);
                break;
              case 'delete':
                await store.deleteVolume(VOLUMES[op.vol]!);
                devs[op.vol] = new DedupDevice(store, store.volumeId(VOLUMES[op.vol]!), SIZE);
                model[op.vol]!.fill(0);
                break;
              case 'compact':
                await compactor.run(true);
                break;
              case 'restart':
                await compactor.close();
                await store.close();
                store = DedupStore.open(dir, silentLogger, opts);
                compactor = new Compactor(store, silentLogger, { intervalMs: 0 });
                devs = VOLUMES.map((v) => new DedupDevice(store, store.volumeId(v), SIZE));
                break;
              case 'check':
                await check();
                break;
            }
          }
          await check();
        } finally {
          await compactor.close();
          await store.close();
        }
        assert.deepEqual(fsckStore(dir).problems, []);
      }),
      { numRuns: 40 },
    );
  });
});
