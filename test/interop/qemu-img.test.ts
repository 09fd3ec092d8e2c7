// qemu-img against the gateway: convert a sparse random image into a volume,
// compare it byte for byte, and map its allocation through block status.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Gateway } from '../helpers/gateway';
import {
  assertDataMatchesWrites,
  createVolume,
  Extent,
  MiB,
  scratchDir,
  writeSparseImage,
} from '../helpers/fixtures';
import { check, run } from '../helpers/run';

interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
}

const SIZE = 48 * MiB;

describe('qemu-img against the gateway', () => {
  let gw: Gateway;
  let dir: string;
  let src: string;
  let written: Extent[];

  before(async () => {
    dir = scratchDir('qemu-img');
    src = path.join(dir, 'src.img');
    written = writeSparseImage(src, SIZE);
    gw = await Gateway.start();
    await createVolume(gw, 'img', '48M');
    await createVolume(gw, 'bigger', '64M');
  });

  after(async () => {
    await gw?.destroy();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('converts a sparse image into a volume that compares identical', async () => {
    // Garbage first, so holes in the source must really be zeroed on the volume.
    await check('qemu-io', ['-f', 'raw', gw.uri('img'), '-c', `write -P 0xee 0 ${SIZE}`], {
      timeoutMs: 60_000,
    });
    await check('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, gw.uri('img')], {
      timeoutMs: 60_000,
    });
    const r = await check('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, gw.uri('img')], {
      timeoutMs: 60_000,
    });
    assert.match(r.stdout, /Images are identical/);
  });

  it('compare notices a single changed byte on the volume', async () => {
    // Flip one byte inside the first written region, then put it back.
    const at = written[0]!.offset + Math.floor(written[0]!.length / 2);
    const original = fs.readFileSync(src).subarray(at, at + 1)[0]!;
    const other = original ^ 0xff;
    await check('qemu-io', ['-f', 'raw', gw.uri('img'), '-c', `write -P ${other} ${at} 1`], {
      timeoutMs: 30_000,
    });
    const r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, gw.uri('img')], {
      timeoutMs: 60_000,
    });
    assert.equal(r.code, 1, r.stdout + r.stderr);
    // qemu-img reports the 512-byte sector holding the first difference.
    const reported = Number(/Content mismatch at offset (\d+)!/.exec(r.stdout)?.[1]);
    assert.ok(reported <= at && at - reported < 512, `mismatch reported at ${reported}, changed ${at}`);
    await check('qemu-io', ['-f', 'raw', gw.uri('img'), '-c', `write -P ${original} ${at} 1`], {
      timeoutMs: 30_000,
    });
    await check('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, gw.uri('img')], { timeoutMs: 60_000 });
  });

  it('maps data where the image has data and zero holes elsewhere', async () => {
    const r = await check('qemu-img', ['map', '--output=json', '-f', 'raw', gw.uri('img')], {
      timeoutMs: 60_000,
    });
    const entries = JSON.parse(r.stdout) as MapEntry[];
    let pos = 0;
    for (const e of entries) {
      assert.equal(e.start, pos, `map is not contiguous at ${pos}`);
      assert.ok(e.present);
      // Every extent is either data, or reads as zeros.
      assert.ok(e.data || e.zero, JSON.stringify(e));
      pos += e.length;
    }
    assert.equal(pos, SIZE);
    assertDataMatchesWrites(
      entries.filter((e) => e.data).map((e) => ({ offset: e.start, length: e.length })),
      written,
      64 * 1024,
    );
    assert.ok(
      entries.some((e) => !e.data && e.zero),
      'no zero holes reported at all',
    );
  });

  it('converts into a larger volume, which compares equal with the tail zero', async () => {
    await check('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, gw.uri('bigger')], {
      timeoutMs: 60_000,
    });
    await check('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, gw.uri('bigger')], {
      timeoutMs: 60_000,
    });
    // Strict mode refuses different sizes, so the size really is the volume's.
    const strict = await run('qemu-img', ['compare', '-s', '-f', 'raw', '-F', 'raw', src, gw.uri('bigger')], {
      timeoutMs: 60_000,
    });
    assert.equal(strict.code, 1, strict.stdout + strict.stderr);
    assert.match(strict.stdout + strict.stderr, /size mismatch/i);
  });
});
