// Snapshots, clones, rollback and diff through real clients: qemu-img compare
// of snapshot exports against the images they were taken of, nbdcopy out of
// clones, qemu-io writes that must stay on their side, a snapshot taken while
// a client writes (every acknowledged write in it, none after), a SIGKILL and
// restart, and the operator's mistakes refused with nothing changed.

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Cmd } from '../../protocol/nbd/constants';
import { fsckStore } from '../../gateway/store/fsck';
import { Gateway } from '../helpers/gateway';
import { createVolume, MiB, scratchDir, sha256File, writeSparseImage } from '../helpers/fixtures';
import { RawClient } from '../helpers/raw-client';
import { check, run } from '../helpers/run';

const SIZE = 16 * MiB;

describe('snapshots and clones', () => {
  let gw: Gateway;
  let dir: string;
  let imageA: string;
  let imageB: string;

  const cli = async (...args: string[]): Promise<string> => {
    const r = await gw.cli(...args);
    assert.equal(r.code, 0, `${args.join(' ')}:\n${r.stderr}`);
    return r.stdout;
  };
  const json = async <T>(...args: string[]): Promise<T> => JSON.parse(await cli(...args, '--json')) as T;
  const refused = async (pattern: RegExp, ...args: string[]): Promise<void> => {
    const r = await gw.cli(...args);
    assert.notEqual(r.code, 0, `${args.join(' ')} should have failed`);
    assert.match(r.stderr, pattern);
  };
  const compare = (a: string, b: string): Promise<unknown> =>
    check('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a, b], { timeoutMs: 60_000 });
  const copyIn = (file: string, exportName: string): Promise<unknown> =>
    check('nbdcopy', ['--flush', file, gw.uri(exportName)], { timeoutMs: 60_000 });

  before(async () => {
    dir = scratchDir('snapshots');
    imageA = path.join(dir, 'a.img');
    imageB = path.join(dir, 'b.img');
    writeSparseImage(imageA, SIZE);
    // B: A with a few changed regions and one trimmed.
    fs.copyFileSync(imageA, imageB);
    const fd = fs.openSync(imageB, 'r+');
    fs.writeSync(fd, crypto.randomBytes(300_000), 0, 300_000, 123_457);
    fs.writeSync(fd, crypto.randomBytes(2 * MiB), 0, 2 * MiB, 6 * MiB);
    fs.writeSync(fd, Buffer.alloc(MiB), 0, MiB, 10 * MiB);
    fs.closeSync(fd);
    gw = await Gateway.start();
  });

  after(async () => {
    await gw?.destroy();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('a snapshot export reads as the volume did when it was taken, and refuses writes', async () => {
    await createVolume(gw, 'v1', '16M');
    await copyIn(imageA, 'v1');
    await cli('snapshot', 'create', 'v1', 's1');
    await copyIn(imageB, 'v1');
    await compare(imageA, gw.uri('v1@s1'));
    await compare(imageB, gw.uri('v1'));
    const w = await run('qemu-io', ['-f', 'raw', gw.uri('v1@s1'), '-c', 'write 0 4096'], {
      timeoutMs: 30_000,
    });
    assert.notEqual(w.code, 0);
    await compare(imageA, gw.uri('v1@s1'));
  });

  it('takes no data space: unique stored bytes do not grow with a snapshot', async () => {
    const before = await json<{ dedup: { uniqueBytes: number } }>('stats');
    await cli('snapshot', 'create', 'v1', 's2');
    const after = await json<{ dedup: { uniqueBytes: number } }>('stats');
    assert.equal(after.dedup.uniqueBytes, before.dedup.uniqueBytes);
    await compare(imageB, gw.uri('v1@s2'));
  });

  it('lists snapshots with their exports and sizes', async () => {
    const list = await json<Array<{ name: string; export: string; size: number }>>('snapshot', 'list', 'v1');
    assert.deepEqual(
      list.map((s) => [s.name, s.export, s.size]),
      [
        ['s1', 'v1@s1', SIZE],
        ['s2', 'v1@s2', SIZE],
      ],
    );
  });

  it('diff names the ranges that changed between two snapshots, and against the volume now', async () => {
    const d = await json<{
      ranges: Array<{ offset: number; length: number; zero: boolean }>;
      changedBytes: number;
    }>('diff', 'v1', 's1', 's2');
    // Every byte that differs between the images lies in a reported range, and every
    // reported 4 KiB block really differs.
    const a = fs.readFileSync(imageA);
    const b = fs.readFileSync(imageB);
    const inRanges = (off: number): boolean =>
      d.ranges.some((r) => off >= r.offset && off < r.offset + r.length);
    for (let blk = 0; blk < SIZE; blk += 4096) {
      const differs = !a.subarray(blk, blk + 4096).equals(b.subarray(blk, blk + 4096));
      assert.equal(inRanges(blk), differs, `block at ${blk}`);
    }
    const now = await json<{ ranges: unknown[] }>('diff', 'v1', 's2');
    assert.deepEqual(now.ranges, []);
    // Either order gives the same ranges.
    const reverse = await json<{ ranges: unknown[] }>('diff', 'v1', 's2', 's1');
    assert.deepEqual(reverse.ranges, d.ranges);
  });

  it('a clone of a snapshot reads as it, and writes on either side never show on the other', async () => {
    const before = await json<{ dedup: { uniqueBytes: number } }>('stats');
    const c = await json<{ name: string; cloneOf: string; size: number }>('clone', 'v1@s1', 'c1');
    assert.equal(c.cloneOf, 'v1@s1');
    assert.equal(c.size, SIZE);
    assert.equal(
      (await json<{ dedup: { uniqueBytes: number } }>('stats')).dedup.uniqueBytes,
      before.dedup.uniqueBytes,
    );
    const out = path.join(dir, 'c1.img');
    await check('nbdcopy', [gw.uri('c1'), out], { timeoutMs: 60_000 });
    assert.equal(sha256File(out), sha256File(imageA));

    await check('qemu-io', ['-f', 'raw', gw.uri('c1'), '-c', 'write -P 0x5a 1M 64k', '-c', 'discard 4M 1M'], {
      timeoutMs: 30_000,
    });
    await check('qemu-io', ['-f', 'raw', gw.uri('v1'), '-c', 'write -P 0xa5 2M 64k'], { timeoutMs: 30_000 });
    await compare(imageA, gw.uri('v1@s1'));
    const expectClone = Buffer.from(fs.readFileSync(imageA));
    expectClone.fill(0x5a, MiB, MiB + 65536);
    expectClone.fill(0, 4 * MiB, 5 * MiB);
    fs.writeFileSync(out, expectClone);
    await compare(out, gw.uri('c1'));
    const expectVolume = Buffer.from(fs.readFileSync(imageB));
    expectVolume.fill(0xa5, 2 * MiB, 2 * MiB + 65536);
    fs.writeFileSync(out, expectVolume);
    await compare(out, gw.uri('v1'));
  });

  it('a clone of a volume takes a snapshot for it, deleted with the clone', async () => {
    await cli('clone', 'v1', 'c2');
    const snaps = await json<Array<{ name: string; forClone: string | null }>>('snapshot', 'list', 'v1');
    assert.ok(snaps.some((s) => s.name === 'clone-c2' && s.forClone === 'c2'));
    await compare(gw.uri('v1'), gw.uri('c2'));
    await cli('volume', 'delete', 'c2');
    const after = await json<Array<{ name: string }>>('snapshot', 'list', 'v1');
    assert.ok(!after.some((s) => s.name === 'clone-c2'));
  });

  it('holds every write acknowledged before the snapshot and none acknowledged after it', async () => {
    // Room for more QD1 writes than the snapshot command's ~0.5 s can take on a fast
    // machine: 2,048 (8 MiB) were all acknowledged before it on one (2026-11-26).
    await createVolume(gw, 'live', '128M');
    const c = await RawClient.connect(gw.socket);
    await c.go('live');
    const BLOCKS = 32768;
    let acked = 0;
    let stop = false;
    // One write at a time, block i filled with i's pattern: the snapshot must hold a prefix.
    const writer = (async () => {
      for (let i = 0; i < BLOCKS && !stop; i++) {
        c.request({ type: Cmd.WRITE, cookieLo: i, offset: i * 4096 }, Buffer.alloc(4096, (i % 255) + 1));
        const r = await c.simpleReply();
        assert.equal(r.error, 0);
        acked = i + 1;
      }
    })();
    await new Promise((r) => setTimeout(r, 150));
    const ackedBefore = acked;
    await cli('snapshot', 'create', 'live', 'mid');
    const ackedAfter = acked;
    stop = true;
    await writer;
    c.disconnect();
    const out = path.join(dir, 'mid.img');
    await check('nbdcopy', [gw.uri('live@mid'), out], { timeoutMs: 60_000 });
    const snap = fs.readFileSync(out);
    let prefix = 0;
    while (prefix < BLOCKS && snap[prefix * 4096] !== 0) prefix++;
    const patterns = Array.from({ length: 256 }, (_, v) => Buffer.alloc(4096, v));
    for (let i = 0; i < BLOCKS; i++) {
      const want = i < prefix ? (i % 255) + 1 : 0;
      assert.ok(snap.subarray(i * 4096, (i + 1) * 4096).equals(patterns[want]!), `block ${i}`);
    }
    assert.ok(
      prefix >= ackedBefore,
      `snapshot holds ${prefix} writes, ${ackedBefore} were acknowledged before it`,
    );
    assert.ok(
      prefix <= ackedAfter + 1,
      `snapshot holds ${prefix} writes, only ${ackedAfter} acknowledged by its end`,
    );
    assert.ok(ackedBefore > 0 && prefix < BLOCKS, 'the snapshot fell inside the writes');
  });

  it('rollback makes the volume read as the snapshot again, and refuses while a client is connected', async () => {
    const c = await RawClient.connect(gw.socket);
    await c.go('v1');
    await refused(/connected client/, 'rollback', 'v1', 's1');
    c.disconnect();
    await new Promise((r) => setTimeout(r, 200));
    await cli('rollback', 'v1', 's1');
    await compare(imageA, gw.uri('v1'));
    // Later snapshots keep their views.
    await compare(imageB, gw.uri('v1@s2'));
  });

  it('keeps snapshots and clones through a SIGKILL and restart, and fsck finds no problem', async () => {
    await gw.kill();
    gw = await Gateway.start({ dataDir: gw.dataDir });
    await compare(imageA, gw.uri('v1@s1'));
    await compare(imageB, gw.uri('v1@s2'));
    await compare(imageA, gw.uri('v1'));
    const expectClone = Buffer.from(fs.readFileSync(imageA));
    expectClone.fill(0x5a, MiB, MiB + 65536);
    expectClone.fill(0, 4 * MiB, 5 * MiB);
    const out = path.join(dir, 'c1.img');
    fs.writeFileSync(out, expectClone);
    await compare(out, gw.uri('c1'));
    await gw.stop();
    assert.deepEqual(fsckStore(path.join(gw.dataDir, 'store')).problems, []);
    gw = await Gateway.start({ dataDir: gw.dataDir });
  });

  it('keeps every snapshot whose command returned through SIGKILLs during later writes and snapshots', async () => {
    await createVolume(gw, 'k', '8M');
    const expected = Buffer.alloc(8 * MiB);
    const taken: Array<{ name: string; file: string }> = [];
    for (let round = 0; round < 5; round++) {
      const pattern = 0x10 + round;
      const at = crypto.randomInt(7) * MiB;
      await check('qemu-io', ['-f', 'raw', gw.uri('k'), '-c', `write -P ${pattern} ${at} 1M`]);
      expected.fill(pattern, at, at + MiB);
      await cli('snapshot', 'create', 'k', `r${round}`);
      const file = path.join(dir, `k-r${round}.img`);
      fs.writeFileSync(file, expected);
      taken.push({ name: `r${round}`, file });
      // Writes (no flush) and another snapshot in flight when the gateway dies.
      const writes = run('qemu-io', ['-f', 'raw', '-t', 'none', gw.uri('k'), '-c', 'write -P 0xee 0 8M'], {
        timeoutMs: 30_000,
      });
      const late = gw.cli('snapshot', 'create', 'k', `late${round}`);
      await new Promise((r) => setTimeout(r, 20 + crypto.randomInt(200)));
      await gw.kill();
      await Promise.all([writes, late]);
      gw = await Gateway.start({ dataDir: gw.dataDir });
      for (const t of taken) await compare(t.file, gw.uri(`k@${t.name}`));
      // The volume now holds either its state at the snapshot or some of the 0xee writes: reset it.
      await check('qemu-io', ['-f', 'raw', gw.uri('k'), '-c', 'write -P 0 0 8M']);
      expected.fill(0);
      const late2 = (await json<Array<{ name: string }>>('snapshot', 'list', 'k')).filter((x) =>
        x.name.startsWith('late'),
      );
      for (const l of late2) await cli('snapshot', 'delete', 'k', l.name);
    }
    for (const t of taken) await cli('snapshot', 'delete', 'k', t.name);
    await cli('volume', 'delete', 'k');
    await gw.stop();
    assert.deepEqual(fsckStore(path.join(gw.dataDir, 'store')).problems, []);
    gw = await Gateway.start({ dataDir: gw.dataDir });
  });

  it('refuses mistakes with a clear error and changes nothing', async () => {
    await refused(/already has a snapshot 's1'/, 'snapshot', 'create', 'v1', 's1');
    await refused(/no volume named 'nope'/, 'snapshot', 'create', 'nope', 'x');
    await refused(/invalid snapshot name/, 'snapshot', 'create', 'v1', 'a@b');
    await refused(/no volume named 'nope'/, 'clone', 'nope', 'c9');
    await refused(/has no snapshot 'zz'/, 'clone', 'v1@zz', 'c9');
    await refused(/already exists/, 'clone', 'v1@s1', 'c1');
    await refused(/has no snapshot 'zz'/, 'rollback', 'v1', 'zz');
    await refused(/has no snapshot 'zz'/, 'diff', 'v1', 'zz');
    await refused(/has clones \(c1\)/, 'snapshot', 'delete', 'v1', 's1');
    await refused(/has snapshots \(s1, s2\)/, 'volume', 'delete', 'v1');
    await createVolume(gw, 'r', '4M', '--backend', 'raw');
    await refused(/need a dedup volume/, 'snapshot', 'create', 'r', 's');
    await refused(/missing argument/, 'snapshot', 'create', 'v1');
    const list = await json<Array<{ name: string }>>('snapshot', 'list', 'v1');
    assert.deepEqual(
      list.map((s) => s.name),
      ['s1', 's2'],
    );
    const vols = await json<Array<{ name: string }>>('volume', 'list');
    assert.ok(!vols.some((v) => v.name === 'c9'));
    await compare(imageA, gw.uri('v1@s1'));
  });

  it('deletes a snapshot after its clone, keeping the older and newer views intact', async () => {
    await cli('volume', 'delete', 'c1');
    await cli('snapshot', 'delete', 'v1', 's1');
    await compare(imageB, gw.uri('v1@s2'));
    await compare(imageA, gw.uri('v1'));
    await cli('snapshot', 'delete', 'v1', 's2');
    await cli('snapshot', 'delete', 'live', 'mid');
    await cli('volume', 'delete', 'v1');
    await gw.stop();
    assert.deepEqual(fsckStore(path.join(gw.dataDir, 'store')).problems, []);
    gw = await Gateway.start({ dataDir: gw.dataDir });
  });
});
