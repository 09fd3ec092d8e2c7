// Portable seeding with live catch-up between two gateways of one cluster: a
// seed export striped with parity over three files while fio writes, an
// import on the second gateway, `replica add --seeded` sending only what
// changed since the export, and qemu-img compare of the two copies. Then a
// lost device rebuilt from parity, a damaged unit repaired, and every kind of
// bad bundle refused with nothing half-imported left behind.

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { SHARD_HEADER_BYTES, UNIT_RECORD } from '../../protocol/seed/bundle';
import { Gateway } from '../helpers/gateway';
import { createVolume, MiB, scratchDir, writeSparseImage } from '../helpers/fixtures';
import { check, run } from '../helpers/run';

const SIZE = 48 * MiB;
const dir = scratchDir('seed');
const keyFile = path.join(dir, 'cluster.key');

function replicationPort(gw: Gateway): number {
  return Number(/replication: gateway [0-9a-f]{32} listening on 127\.0\.0\.1:(\d+)/.exec(gw.log)![1]);
}

const args = (key = keyFile): string[] => ['--cluster-key', key, '--replication-listen', '127.0.0.1:0'];

describe('seed bundles', () => {
  let a: Gateway; // the source
  let b: Gateway; // the far site
  const bundle = ['s1', 's2', 's3'].map((n) => path.join(dir, `${n}.seed`));
  let snapshot = '';

  const ok = async (gw: Gateway, ...argv: string[]): Promise<string> => {
    const r = await gw.cli(...argv);
    assert.equal(r.code, 0, `${argv.join(' ')}:\n${r.stderr}`);
    return r.stdout;
  };
  const refused = async (gw: Gateway, pattern: RegExp, ...argv: string[]): Promise<void> => {
    const r = await gw.cli(...argv);
    assert.notEqual(r.code, 0, `${argv.join(' ')} should have failed`);
    assert.match(r.stderr, pattern);
  };
  const compare = async (x: string, y: string): Promise<void> => {
    const r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', x, y], { timeoutMs: 60_000 });
    assert.equal(r.code, 0, r.stdout + r.stderr);
  };
  const volumes = async (gw: Gateway): Promise<string[]> =>
    (JSON.parse(await ok(gw, 'volume', 'list', '--json')) as Array<{ name: string }>).map((v) => v.name);

  before(async () => {
    fs.writeFileSync(keyFile, crypto.randomBytes(32), { mode: 0o600 });
    [a, b] = await Promise.all([Gateway.start({ args: args() }), Gateway.start({ args: args() })]);
    await createVolume(a, 'sv', '48M');
    const image = path.join(dir, 'base.img');
    writeSparseImage(image, SIZE);
    await check('nbdcopy', ['--flush', image, a.uri('sv')], { timeoutMs: 60_000 });
  });
  after(async () => {
    await a?.destroy();
    await b?.destroy();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('exports while fio writes, imports on another gateway, and catches up sending only what changed', async () => {
    const load = run(
      'fio',
      [
        '--name=load',
        '--ioengine=nbd',
        `--uri=${a.uri('sv')}`,
        '--rw=randwrite',
        '--bs=64k',
        '--iodepth=4',
        // A quarter of the volume: the catch-up must send that, not all of it.
        '--size=12M',
        '--io_size=8M',
        '--refill_buffers',
      ],
      { timeoutMs: 120_000 },
    );
    const exported = JSON.parse(
      await ok(
        a,
        'seed',
        'export',
        'sv',
        '--to',
        bundle[0]!,
        '--to',
        bundle[1]!,
        '--to',
        bundle[2]!,
        '--json',
      ),
    ) as { snapshot: string; paths: string[] };
    snapshot = exported.snapshot;
    assert.equal((await load).code, 0);
    // Writes after the export point, on top of fio's.
    await check('qemu-io', ['-f', 'raw', a.uri('sv'), '-c', 'write -P 0x77 40M 2M']);

    const imported = JSON.parse(await ok(b, 'seed', 'import', ...bundle, '--as', 'sv', '--json')) as {
      repaired: string[];
    };
    assert.deepEqual(imported.repaired, []);
    await compare(a.uri(`sv@${snapshot}`), b.uri('sv'));

    await ok(a, 'replica', 'add', 'sv', '--to', `127.0.0.1:${replicationPort(b)}`, '--seeded');
    await a.waitForLog(/holds the seed: (\d+) chunk\(s\) changed since/, 30_000);
    const changed = Number(/holds the seed: (\d+) chunk\(s\) changed since/.exec(a.log)![1]);
    assert.ok(changed > 0 && changed <= 5, `${changed} chunks changed of ${SIZE / (4 * MiB)}`);
    const deadline = Date.now() + 60_000;
    for (;;) {
      const l = JSON.parse(await ok(a, 'replica', 'list', 'sv', '--json')) as {
        replicas: Array<{ state: string; lagBytes: number }>;
      };
      if (l.replicas.every((r) => r.state === 'in-sync' && r.lagBytes === 0)) break;
      assert.ok(Date.now() < deadline, `never in sync: ${JSON.stringify(l)}`);
      await new Promise((r) => setTimeout(r, 200));
    }
    await compare(a.uri('sv'), b.uri('sv'));
  });

  it('a snapshot taken on the primary appears on its in-sync replica, no data sent again', async () => {
    await check('qemu-io', ['-f', 'raw', a.uri('sv'), '-c', 'write -P 0x5c 1M 1M']);
    const sent = async (): Promise<number> =>
      (
        JSON.parse(await ok(a, 'replica', 'list', 'sv', '--json')) as {
          replicas: Array<{ sentBlocks: number }>;
        }
      ).replicas[0]!.sentBlocks;
    const blocksBefore = await sent();
    const snap = JSON.parse(await ok(a, 'snapshot', 'create', 'sv', 'mirrored', '--json')) as {
      mirroredTo: string[];
    };
    assert.deepEqual(snap.mirroredTo, [`127.0.0.1:${replicationPort(b)}`]);
    await b.waitForLog(/volume sv: snapshot mirrored taken as on gateway/, 10_000);
    await check('qemu-io', ['-f', 'raw', a.uri('sv'), '-c', 'write -P 0x5d 1M 1M']);
    await compare(a.uri('sv@mirrored'), b.uri('sv@mirrored'));
    // The second write's 256 blocks went; the snapshot itself sent none.
    assert.equal((await sent()) - blocksBefore, 256);
  });

  it('--cutover makes the seeded replica the primary and this copy its replica', async () => {
    await createVolume(a, 'mv', '16M');
    await check('qemu-io', ['-f', 'raw', a.uri('mv'), '-c', 'write -P 0x61 0 8M']);
    const seed = path.join(dir, 'mv.seed');
    await ok(a, 'seed', 'export', 'mv', '--to', seed);
    await check('qemu-io', ['-f', 'raw', a.uri('mv'), '-c', 'write -P 0x62 8M 1M']);
    await ok(b, 'seed', 'import', seed, '--as', 'mv');
    await ok(
      a,
      'replica',
      'add',
      'mv',
      '--to',
      `127.0.0.1:${replicationPort(b)}`,
      '--seeded',
      '--cutover',
      '--threshold',
      '1M',
    );
    await a.waitForLog(/volume mv: cut over to/, 30_000);
    const role = async (gw: Gateway): Promise<{ role: string; generation: number }> =>
      JSON.parse(await ok(gw, 'replica', 'list', 'mv', '--json')) as { role: string; generation: number };
    const promoted = await role(b);
    assert.equal(promoted.role, 'primary');
    assert.equal(promoted.generation, 2);
    assert.equal((await role(a)).role, 'replica');
    await compare(a.uri('mv'), b.uri('mv'));
    const w = await run('qemu-io', ['-f', 'raw', a.uri('mv'), '-c', 'write 0 4k']);
    assert.match(w.stdout + w.stderr, /Operation not permitted|Permission denied|read-only/i);
    await check('qemu-io', ['-f', 'raw', b.uri('mv'), '-c', 'write -P 0x63 0 4k']);
  });

  it('rebuilds a lost device from the parity of the others', async () => {
    const r = JSON.parse(await ok(b, 'seed', 'import', bundle[0]!, bundle[2]!, '--as', 'lost', '--json')) as {
      repaired: string[];
    };
    assert.ok(r.repaired.length > 0);
    await compare(a.uri(`sv@${snapshot}`), b.uri('lost'));
  });

  it('repairs a damaged unit from its row and says so', async () => {
    const damaged = path.join(dir, 'damaged.seed');
    fs.copyFileSync(bundle[1]!, damaged);
    const fd = fs.openSync(damaged, 'r+');
    fs.writeSync(fd, Buffer.from('garbage!'), 0, 8, SHARD_HEADER_BYTES + 32 + 1000);
    fs.closeSync(fd);
    const r = JSON.parse(
      await ok(b, 'seed', 'import', bundle[0]!, damaged, bundle[2]!, '--as', 'fixed', '--json'),
    ) as { repaired: string[] };
    assert.ok(
      r.repaired.some((x) => x.includes('damaged.seed')),
      JSON.stringify(r.repaired),
    );
    await compare(a.uri(`sv@${snapshot}`), b.uri('fixed'));
  });

  it('refuses a bundle with two parts missing or damaged in one row, importing nothing', async () => {
    const before = await volumes(b);
    await refused(
      b,
      /shard\(s\) 1, 2 missing|at least 2 are needed/,
      'seed',
      'import',
      bundle[0]!,
      '--as',
      'x1',
    );
    const damaged = path.join(dir, 'damaged2.seed');
    fs.copyFileSync(bundle[1]!, damaged);
    const fd = fs.openSync(damaged, 'r+');
    fs.writeSync(fd, Buffer.from('garbage!'), 0, 8, SHARD_HEADER_BYTES + 32 + 1000);
    fs.closeSync(fd);
    await refused(b, /row 0 of the bundle is damaged/, 'seed', 'import', bundle[0]!, damaged, '--as', 'x2');
    assert.deepEqual(await volumes(b), before);
  });

  it('refuses a truncated single-file bundle, naming what is wrong', async () => {
    await createVolume(a, 'small', '8M');
    await check('qemu-io', ['-f', 'raw', a.uri('small'), '-c', 'write -P 0x42 0 6M']);
    const one = path.join(dir, 'one.seed');
    await ok(a, 'seed', 'export', 'small', '--to', one);
    const cut = path.join(dir, 'cut.seed');
    fs.copyFileSync(one, cut);
    fs.truncateSync(cut, SHARD_HEADER_BYTES + UNIT_RECORD / 2);
    const before = await volumes(b);
    await refused(b, /row 0 of the bundle is damaged in .*cut\.seed/, 'seed', 'import', cut, '--as', 'x3');
    assert.deepEqual(await volumes(b), before);
    // And the whole one imports.
    await ok(b, 'seed', 'import', one, '--as', 'small');
  });

  it('refuses a foreign bundle, an existing volume without --force, and files that are not bundles', async () => {
    const otherKey = path.join(dir, 'other.key');
    fs.writeFileSync(otherKey, crypto.randomBytes(32), { mode: 0o600 });
    const c = await Gateway.start({ args: args(otherKey) });
    try {
      await refused(c, /foreign bundle/, 'seed', 'import', path.join(dir, 'one.seed'), '--as', 'f');
      assert.ok(!(await volumes(c)).includes('f'));
    } finally {
      await c.destroy();
    }
    await refused(b, /exists: use --force/, 'seed', 'import', path.join(dir, 'one.seed'), '--as', 'small');
    const junk = path.join(dir, 'junk.seed');
    fs.writeFileSync(junk, crypto.randomBytes(8192));
    await refused(b, /not a blockgate seed bundle/, 'seed', 'import', junk, '--as', 'j');
    await refused(b, /no such file/, 'seed', 'import', path.join(dir, 'nope.seed'), '--as', 'j');
    await refused(a, /exists: a seed never overwrites/, 'seed', 'export', 'small', '--to', junk);
    await refused(a, /seed export needs --to/, 'seed', 'export', 'small');
  });

  it('replaces an existing volume with --force', async () => {
    const r = await b.cli('seed', 'import', path.join(dir, 'one.seed'), '--as', 'small', '--force');
    assert.equal(r.code, 0, r.stderr);
    await compare(a.uri('small'), b.uri('small'));
  });
});
