import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { openIndex } from '../../gateway/store/index-db';
import { MASK_BLOCK, ZERO_BLOCK, encodeId, encodeMetaKey } from '../../gateway/store/layout';
import {
  META_SLOTS,
  convertLegacyMeta,
  emptyMetaPage,
  forEachMeta,
  isEmptyMetaPage,
  lookupMetaPage,
  MetaPageError,
  setSlot,
  slotId,
} from '../../gateway/store/meta-pages';
import { setMetaEntry } from '../helpers/metamap';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-meta-pages-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

describe('metamap pages', () => {
  it('keeps a hole apart from a zero block, a mask and the largest ids', () => {
    const page = emptyMetaPage();
    assert.ok(isEmptyMetaPage(page));
    const ids = [ZERO_BLOCK, MASK_BLOCK, 1, 2 ** 32 + 5, 2 ** 48];
    ids.forEach((id, slot) => setSlot(page, slot, id));
    ids.forEach((id, slot) => assert.equal(slotId(page, slot), id));
    assert.equal(slotId(page, META_SLOTS - 1), undefined);
    for (let slot = 0; slot < ids.length; slot++) setSlot(page, slot, undefined);
    assert.ok(isEmptyMetaPage(page));
  });

  it('scans the entries of a block range that starts and ends inside pages, of one volume only', async () => {
    const { env, meta } = openIndex(path.join(tmp, 'scan'));
    for (const lba of [0, 3, 15, 16, 17, 40, 47]) await setMetaEntry(meta!, 2, lba, 100 + lba);
    await setMetaEntry(meta!, 1, 5, 7);
    await setMetaEntry(meta!, 3, 0, 8);
    const seen = (range: { volume: number; from: number; to?: number } | null): string[] => {
      const out: string[] = [];
      forEachMeta(meta!, range, (v, lba, id) => out.push(`${v}:${lba}=${id}`));
      return out;
    };
    assert.deepEqual(seen({ volume: 2, from: 3, to: 17 }), ['2:3=103', '2:15=115', '2:16=116']);
    assert.deepEqual(seen({ volume: 2, from: 16 }), ['2:16=116', '2:17=117', '2:40=140', '2:47=147']);
    assert.deepEqual(seen(null).length, 9);
    assert.equal(lookupMetaPage(meta!, 2, 47, Buffer.alloc(12)), 147);
    assert.equal(lookupMetaPage(meta!, 2, 46, Buffer.alloc(12)), undefined);
    await env.close();
  });

  it('refuses a page of the wrong length: lookups throw, a scan hands it to its handler', async () => {
    const { env, meta } = openIndex(path.join(tmp, 'bad'));
    await setMetaEntry(meta!, 1, 20, 9);
    const key = Buffer.alloc(12);
    key.writeUInt32BE(1, 0);
    await meta!.put(key, Buffer.alloc(10));
    assert.throws(() => lookupMetaPage(meta!, 1, 3, Buffer.alloc(12)), MetaPageError);
    const bad: string[] = [];
    const ids: number[] = [];
    forEachMeta(
      meta!,
      { volume: 1, from: 0 },
      (_v, _lba, id) => ids.push(id),
      (err) => bad.push(err.message),
    );
    assert.deepEqual(ids, [9]);
    assert.match(bad[0]!, /volume #1 at block 0 holds 10 bytes/);
    await env.close();
  });
  it('converts entries kept one per block into pages, by volume and page, and empties the old tree', async () => {
    const { env, meta, legacyMeta } = openIndex(path.join(tmp, 'convert'));
    const entries: Array<[number, number, number]> = [
      [1, 0, 10],
      [1, 15, 11],
      [1, 16, 12],
      [2, 3, 13],
    ];
    for (const [volume, lba, id] of entries) await legacyMeta!.put(encodeMetaKey(volume, lba), encodeId(id));
    assert.equal(convertLegacyMeta(env, legacyMeta!, meta!), 4);
    assert.equal(legacyMeta!.getKeysCount(), 0);
    assert.equal(meta!.getKeysCount(), 3);
    const seen: Array<[number, number, number]> = [];
    forEachMeta(meta!, null, (volume, lba, id) => seen.push([volume, lba, id]));
    assert.deepEqual(seen, entries);
    assert.equal(convertLegacyMeta(env, legacyMeta!, meta!), 0);
    await env.close();
  });

  it('leaves both trees as they were when an entry cannot be converted', async () => {
    const { env, meta, legacyMeta } = openIndex(path.join(tmp, 'convert-bad'));
    await legacyMeta!.put(encodeMetaKey(1, 0), encodeId(10));
    await legacyMeta!.put(encodeMetaKey(1, 40), Buffer.alloc(5));
    assert.throws(
      () => convertLegacyMeta(env, legacyMeta!, meta!),
      /volume #1 block 40: metamap entry of 5 bytes/,
    );
    assert.equal(legacyMeta!.getKeysCount(), 2);
    assert.equal(meta!.getKeysCount(), 0);
    await env.close();
  });
});
