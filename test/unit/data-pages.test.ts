import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { open } from 'lmdb';
import type { Database } from 'lmdb';
import {
  DATA_PAGE_BYTES,
  DataPageError,
  PAGE_ENTRIES,
  convertLegacyRows,
  dataEntries,
  dataPageKeyInto,
  emptyPage,
  entryOffset,
  isEmptyPage,
  setPresent,
} from '../../gateway/store/data-pages';
import { DATA_ENTRY, encodeId } from '../../gateway/store/layout';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-pages-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));
let n = 0;

function trees(): {
  env: ReturnType<typeof open>;
  legacy: Database<Buffer, Buffer>;
  pages: Database<Buffer, Buffer>;
} {
  const env = open({ path: path.join(tmp, `e${n++}`), maxDbs: 4, compression: false });
  const binary = { keyEncoding: 'binary' as const, encoding: 'binary' as const };
  return {
    env,
    legacy: env.openDB<Buffer, Buffer>({ name: 'data', ...binary }),
    pages: env.openDB<Buffer, Buffer>({ name: 'data-pages', ...binary }),
  };
}

/** A 36-byte entry whose bytes all say `id` (low byte), to tell entries apart. */
function entryFor(id: number): Buffer {
  return Buffer.alloc(DATA_ENTRY, id & 0xff);
}

describe('datamap pages', () => {
  it('keeps each of the 32 slots of a page apart, the last one included', () => {
    const page = emptyPage();
    const base = 7 * PAGE_ENTRIES;
    const used = [0, 1, 5, 30, 31];
    for (const slot of used) entryFor(slot).copy(page, setPresent(page, base + slot, true));
    for (let slot = 0; slot < PAGE_ENTRIES; slot++) {
      const at = entryOffset(page, base + slot);
      if (!used.includes(slot)) assert.equal(at, -1, `slot ${slot} is free`);
      else assert.ok(page.subarray(at, at + DATA_ENTRY).equals(entryFor(slot)), `slot ${slot}`);
    }
    for (const slot of used) setPresent(page, base + slot, false);
    assert.ok(isEmptyPage(page));
  });

  it('keys a page by id / 32', () => {
    assert.ok(dataPageKeyInto(31, Buffer.alloc(8)).equals(encodeId(0)));
    assert.ok(dataPageKeyInto(32, Buffer.alloc(8)).equals(encodeId(1)));
    assert.ok(dataPageKeyInto(2 ** 40 + 5, Buffer.alloc(8)).equals(encodeId(2 ** 35)));
  });

  it('refuses a page of the wrong length', () => {
    assert.throws(() => entryOffset(Buffer.alloc(DATA_PAGE_BYTES - 1), 3), DataPageError);
  });

  it('lists every entry in id order, reporting a damaged page and going on', async () => {
    const { env, pages } = trees();
    const ids = [1, 2, 31, 32, 70, 100];
    const byPage = new Map<number, Buffer>();
    for (const id of ids) {
      const key = Math.floor(id / PAGE_ENTRIES);
      const page = byPage.get(key) ?? emptyPage();
      entryFor(id).copy(page, setPresent(page, id, true));
      byPage.set(key, page);
    }
    for (const [key, page] of byPage) await pages.put(encodeId(key), page);
    await pages.put(encodeId(2), Buffer.alloc(10)); // ids 64-95: damaged
    const bad: string[] = [];
    const seen = [...dataEntries({ data: pages, legacyData: undefined }, (e) => bad.push(e.message))];
    assert.deepEqual(
      seen.map((e) => e.id),
      [1, 2, 31, 32, 100],
    );
    for (const { id, entry } of seen) assert.ok(entry.equals(entryFor(id)));
    assert.deepEqual(bad, ['datamap page 2 holds 10 bytes, not 1156']);
    await env.close();
  });

  it('converts rows kept an entry per id into pages, and empties the old tree', async () => {
    const { env, legacy, pages } = trees();
    for (const id of [3, 4, 40]) await legacy.put(encodeId(id), entryFor(id));
    assert.equal(convertLegacyRows(env, legacy, pages), 3);
    assert.equal(legacy.getKeysCount(), 0);
    assert.equal(pages.getKeysCount(), 2);
    const seen = [...dataEntries({ data: pages, legacyData: legacy }, (e) => assert.fail(e))];
    assert.deepEqual(
      seen.map((e) => e.id),
      [3, 4, 40],
    );
    assert.equal(convertLegacyRows(env, legacy, pages), 0);
    await env.close();
  });

  it('leaves both trees as they were when a row cannot be converted', async () => {
    const { env, legacy, pages } = trees();
    await legacy.put(encodeId(3), entryFor(3));
    await legacy.put(encodeId(9), Buffer.alloc(20));
    assert.throws(() => convertLegacyRows(env, legacy, pages), /block 9: datamap entry of 20 bytes/);
    assert.equal(legacy.getKeysCount(), 2);
    assert.equal(pages.getKeysCount(), 0);
    await env.close();
  });
});
