// Snapshots and clones of the dedup store against a reference model: random
// sequences of writes, trims and zeroes on volumes and clones, snapshots,
// snapshot deletes, clones of snapshots, rollbacks, clone deletes, shrinking
// and growing, compactions and restarts. Every volume, snapshot and clone
// must read as the model says, a diff must name exactly the blocks that
// differ, and fsck must find every reference count exact.

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

const BLOCKS = 16;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-snapmodel-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

function content(k: number): Buffer {
  const b = Buffer.alloc(4096);
  for (let i = 0; i < 4096; i++) b[i] = (k * 53 + (i % (k + 5))) & 0xff;
  return b;
}

type Op =
  | { kind: 'write'; pick: number; lba: number; count: number; k: number }
  | { kind: 'trim' | 'zero'; pick: number; lba: number; count: number }
  | {
      kind: 'snapshot' | 'clone' | 'dropSnapshot' | 'rollback' | 'dropClone' | 'diff';
      pick: number;
      pick2: number;
    }
  | { kind: 'resize'; pick: number; blocks: number }
  | { kind: 'compact' | 'restart' | 'check' };

const pick = fc.nat(1000);
const run = fc
  .tuple(fc.integer({ min: 0, max: BLOCKS - 1 }), fc.integer({ min: 1, max: 4 }))
  .map(([lba, count]) => ({ lba, count: Math.min(count, BLOCKS - lba) }));
const opArb: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 8,
    arbitrary: fc
      .tuple(pick, run, fc.integer({ min: 0, max: 4 }))
      .map(([p, r, k]) => ({ kind: 'write' as const, pick: p, ...r, k })),
  },
  {
    weight: 2,
    arbitrary: fc
      .tuple(fc.constantFrom('trim' as const, 'zero' as const), pick, run)
      .map(([kind, p, r]) => ({ kind, pick: p, ...r })),
  },
  {
    weight: 6,
    arbitrary: fc
      .tuple(
        fc.constantFrom(
          'snapshot' as const,
          'snapshot' as const,
          'clone' as const,
          'dropSnapshot' as const,
          'rollback' as const,
          'dropClone' as const,
          'diff' as const,
          'diff' as const,
        ),
        pick,
        pick,
      )
      .map(([kind, p, p2]) => ({ kind, pick: p, pick2: p2 })),
  },
  {
    weight: 1,
    arbitrary: fc
      .tuple(pick, fc.integer({ min: BLOCKS / 2, max: BLOCKS }))
      .map(([p, blocks]) => ({ kind: 'resize' as const, pick: p, blocks })),
  },
  {
    weight: 2,
    arbitrary: fc.constantFrom(
      { kind: 'compact' as const },
      { kind: 'restart' as const },
      { kind: 'check' as const },
    ),
  },
);

interface ModelVolume {
  name: string;
  data: Buffer;
  /** For snapshots: the volume it was taken of. */
  of?: string;
  /** For clones: the snapshot it reads through. */
  base?: string;
}

let runNo = 0;

describe('snapshots and clones against a model', () => {
  it('match the model through snapshots, clones, rollbacks, deletes, resizes, compactions and restarts', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(opArb, { minLength: 1, maxLength: 30 }), async (ops) => {
        const dir = path.join(tmp, `m${runNo++}`);
        const opts = [{ metaCacheBytes: 0 }, { metaCacheBytes: META_PAGE_BYTES }, {}][runNo % 3]!;
        let store = DedupStore.open(dir, silentLogger, opts);
        let compactor = new Compactor(store, silentLogger, { intervalMs: 0 });
        const vols: ModelVolume[] = [{ name: 'o', data: Buffer.alloc(BLOCKS * 4096) }];
        let seq = 0;
        const writable = (): ModelVolume[] => vols.filter((v) => v.of === undefined);
        const snapshots = (): ModelVolume[] => vols.filter((v) => v.of !== undefined);
        const dev = (v: ModelVolume): DedupDevice =>
          new DedupDevice(store, store.volumeId(v.name), v.data.length);
        const blocksOf = (v: ModelVolume): number => v.data.length / 4096;
        const hasDependents = (v: ModelVolume): boolean =>
          vols.some((x) => x.base === v.name || (v.of === undefined && x.of === v.name));

        const check = async (): Promise<void> => {
          for (const v of vols) {
            const got = Buffer.alloc(v.data.length);
            await dev(v).read(0, got);
            assert.ok(got.equals(v.data), `${v.name} differs from the model`);
          }
        };

        try {
          for (const op of ops) {
            switch (op.kind) {
              case 'write':
              case 'trim':
              case 'zero': {
                const w = writable();
                const v = w[op.pick % w.length]!;
                if (op.lba + op.count > blocksOf(v)) break;
                const d = dev(v);
                if (op.kind === 'write') {
                  const data = Buffer.concat(Array.from({ length: op.count }, () => content(op.k)));
                  await d.write(op.lba * 4096, data);
                  data.copy(v.data, op.lba * 4096);
                } else {
                  if (op.kind === 'trim') await d.trim(op.lba * 4096, op.count * 4096);
                  else await d.writeZeroes(op.lba * 4096, op.count * 4096, { noHole: true });
                  v.data.fill(0, op.lba * 4096, (op.lba + op.count) * 4096);
                }
                break;
              }
              case 'snapshot': {
                const w = writable();
                const v = w[op.pick % w.length]!;
                const name = `${v.name}@s${seq++}`;
                store.snapshotVolume(store.volumeId(v.name), name, blocksOf(v));
                vols.push({ name, data: Buffer.from(v.data), of: v.name });
                break;
              }
              case 'clone': {
                const s = snapshots();
                if (!s.length) break;
                const base = s[op.pick % s.length]!;
                const name = `c${seq++}`;
                store.cloneVolume(store.volumeId(base.name), name, blocksOf(base));
                vols.push({ name, data: Buffer.from(base.data), base: base.name });
                break;
              }
              case 'dropSnapshot': {
                const s = snapshots().filter((x) => !hasDependents(x));
                if (!s.length) break;
                const v = s[op.pick % s.length]!;
                await store.deleteVolume(v.name);
                vols.splice(vols.indexOf(v), 1);
                break;
              }
              case 'dropClone': {
                const c = vols.filter((x) => x.base !== undefined && !hasDependents(x));
                if (!c.length) break;
                const v = c[op.pick % c.length]!;
                await store.deleteVolume(v.name);
                vols.splice(vols.indexOf(v), 1);
                break;
              }
              case 'rollback': {
                const s = snapshots();
                if (!s.length) break;
                const snap = s[op.pick % s.length]!;
                const v = vols.find((x) => x.name === snap.of)!;
                const origin = store.volumeId(v.name);
                if (blocksOf(v) > blocksOf(snap)) await store.truncateVolume(origin, blocksOf(snap));
                store.rollbackVolume(origin, store.volumeId(snap.name));
                v.data = Buffer.from(snap.data);
                break;
              }
              case 'diff': {
                const s = snapshots();
                if (!s.length) break;
                const a = s[op.pick % s.length]!;
                const later = s.filter(
                  (x) => x.of === a.of && store.isOlder(store.volumeId(a.name), store.volumeId(x.name)),
                );
                const candidates = [...later, vols.find((x) => x.name === a.of)!];
                const b = candidates[op.pick2 % candidates.length]!;
                const got = store
                  .changedBlocks(store.volumeId(a.name), blocksOf(a), store.volumeId(b.name), blocksOf(b))
                  .map((c) => c.lba)
                  .sort((x, y) => x - y);
                const want: number[] = [];
                for (let lba = 0; lba < Math.max(blocksOf(a), blocksOf(b)); lba++) {
                  const blk = (m: ModelVolume): Buffer =>
                    lba < blocksOf(m) ? m.data.subarray(lba * 4096, (lba + 1) * 4096) : Buffer.alloc(4096);
                  if (!blk(a).equals(blk(b))) want.push(lba);
                }
                assert.deepEqual(got, want, `diff ${a.name} ${b.name}`);
                break;
              }
              case 'resize': {
                const w = writable();
                const v = w[op.pick % w.length]!;
                if (op.blocks < blocksOf(v)) await store.truncateVolume(store.volumeId(v.name), op.blocks);
                const data = Buffer.alloc(op.blocks * 4096);
                v.data.copy(data, 0, 0, Math.min(v.data.length, data.length));
                v.data = data;
                break;
              }
              case 'compact':
                await compactor.run(true);
                break;
              case 'restart':
                await compactor.close();
                await store.close();
                store = DedupStore.open(dir, silentLogger, opts);
                compactor = new Compactor(store, silentLogger, { intervalMs: 0 });
                break;
              case 'check':
                await check();
                break;
            }
          }
          await check();
          await store.collect();
        } finally {
          await compactor.close();
          await store.close();
        }
        assert.deepEqual(fsckStore(dir).problems, []);
      }),
      { numRuns: 60 },
    );
  });
});
