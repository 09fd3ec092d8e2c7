// nbdinfo (libnbd) against the gateway: export listing, the flags and sizes
// negotiated, block status through --map, and the --can answers.

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Gateway } from '../helpers/gateway';
import { assertDataMatchesWrites, createVolume, Extent, KiB, MiB } from '../helpers/fixtures';
import { check, run } from '../helpers/run';

interface ExportInfo {
  'export-name': string;
  'export-size': number;
  description?: string;
  contexts: string[];
  is_read_only: boolean;
  is_rotational: boolean;
  can_cache: boolean;
  can_df: boolean;
  can_fast_zero: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_multi_conn: boolean;
  can_trim: boolean;
  can_zero: boolean;
  block_size_minimum: number;
  block_size_preferred: number;
  block_size_maximum: number;
}

interface InfoJson {
  protocol: string;
  TLS: boolean;
  structured: boolean;
  exports: ExportInfo[];
}

interface MapEntry {
  offset: number;
  length: number;
  type: number;
  description: string;
}

const GiB = 1024 * MiB;
const VOL_SIZE = 64 * MiB;

describe('nbdinfo against the gateway', () => {
  let gw: Gateway;

  before(async () => {
    gw = await Gateway.start();
    await createVolume(gw, 'vol1', '64M');
    await createVolume(gw, 'frozen', '16M', '--read-only');
    await createVolume(gw, 'mapped', '64M');
  });

  after(async () => {
    await gw?.destroy();
  });

  const info = async (uri: string, ...args: string[]): Promise<InfoJson> =>
    JSON.parse((await check('nbdinfo', ['--json', ...args, uri], { timeoutMs: 20_000 })).stdout) as InfoJson;

  const map = async (uri: string): Promise<MapEntry[]> =>
    JSON.parse(
      (await check('nbdinfo', ['--map', '--json', uri], { timeoutMs: 20_000 })).stdout,
    ) as MapEntry[];

  it('lists disk0 and created volumes with their sizes', async () => {
    const listing = await info(`nbd+unix://?socket=${gw.socket}`, '--list');
    const sizes = Object.fromEntries(listing.exports.map((e) => [e['export-name'], e['export-size']]));
    assert.equal(sizes.disk0, 8 * GiB);
    assert.equal(sizes.vol1, VOL_SIZE);
    assert.equal(sizes.frozen, 16 * MiB);

    // The plain-text listing names them too.
    const text = await check('nbdinfo', ['--list', `nbd+unix://?socket=${gw.socket}`], { timeoutMs: 20_000 });
    assert.match(text.stdout, /export="disk0":/);
    assert.match(text.stdout, /export="vol1":/);
  });

  it('reports size, flags and block sizes of a writable volume as JSON', async () => {
    const j = await info(gw.uri('vol1'));
    assert.equal(j.protocol, 'newstyle-fixed');
    assert.equal(j.structured, true);
    assert.equal(j.exports.length, 1);
    const e = j.exports[0];
    assert.equal(e['export-name'], 'vol1');
    assert.equal(e['export-size'], VOL_SIZE);
    assert.ok(e.contexts.includes('base:allocation'), `contexts: ${e.contexts.join(',')}`);
    assert.equal(e.is_read_only, false);
    for (const flag of [
      'can_cache',
      'can_df',
      'can_fast_zero',
      'can_flush',
      'can_fua',
      'can_multi_conn',
      'can_trim',
      'can_zero',
    ] as const) {
      assert.equal(e[flag], true, flag);
    }
    // Block size constraints as the protocol requires them.
    const pow2 = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;
    assert.ok(pow2(e.block_size_minimum) && e.block_size_minimum <= 64 * KiB, `min ${e.block_size_minimum}`);
    assert.ok(
      pow2(e.block_size_preferred) && e.block_size_preferred >= 512,
      `pref ${e.block_size_preferred}`,
    );
    assert.ok(e.block_size_maximum >= MiB, `max ${e.block_size_maximum}`);
  });

  it('reports a read-only volume as read-only', async () => {
    const e = (await info(gw.uri('frozen'))).exports[0];
    assert.equal(e['export-size'], 16 * MiB);
    assert.equal(e.is_read_only, true);
    assert.equal(e.can_trim, false);
    assert.equal(e.can_zero, false);
  });

  it('maps a fresh volume as one hole, then data exactly where qemu-io wrote', async () => {
    const uri = gw.uri('mapped');
    assert.deepEqual(await map(uri), [{ offset: 0, length: VOL_SIZE, type: 3, description: 'hole,zero' }]);

    const written: Extent[] = [
      { offset: 1 * MiB, length: 64 * KiB },
      { offset: 5 * MiB + 1000, length: 3000 },
      { offset: VOL_SIZE - 4 * KiB, length: 4 * KiB },
    ];
    await check(
      'qemu-io',
      ['-f', 'raw', uri, ...written.flatMap((w) => ['-c', `write -P 0x5c ${w.offset} ${w.length}`])],
      { timeoutMs: 20_000 },
    );

    const extents = await map(uri);
    // The extents tile the export, in order, without gaps or overlap.
    let pos = 0;
    for (const x of extents) {
      assert.equal(x.offset, pos, JSON.stringify(extents));
      assert.ok(x.length > 0);
      pos += x.length;
    }
    assert.equal(pos, VOL_SIZE);
    // Only two kinds: data, and hole+zero.
    for (const x of extents) assert.ok(x.type === 0 || x.type === 3, JSON.stringify(x));
    assertDataMatchesWrites(
      extents.filter((x) => x.type === 0),
      written,
      64 * KiB,
    );
    // Most of the volume is still a hole.
    const holes = extents.filter((x) => x.type === 3).reduce((n, x) => n + x.length, 0);
    assert.ok(holes >= VOL_SIZE - 1 * MiB, `only ${holes} bytes of holes`);
  });

  it('answers --can with success for every feature of a writable volume', async () => {
    for (const feature of [
      'multi-conn',
      'fua',
      'trim',
      'zero',
      'fast-zero',
      'df',
      'cache',
      'flush',
      'write',
    ]) {
      const r = await run('nbdinfo', ['--can', feature, gw.uri('vol1')], { timeoutMs: 20_000 });
      assert.equal(r.code, 0, `--can ${feature}: exit ${r.code ?? r.signal}\n${r.stderr}`);
    }
  });

  it('answers --can write with false (exit 2) on a read-only volume', async () => {
    const r = await run('nbdinfo', ['--can', 'write', gw.uri('frozen')], { timeoutMs: 20_000 });
    assert.equal(r.code, 2, r.stderr);
    const ro = await run('nbdinfo', ['--is', 'read-only', gw.uri('frozen')], { timeoutMs: 20_000 });
    assert.equal(ro.code, 0, ro.stderr);
    // The writable volume says the opposite.
    const rw = await run('nbdinfo', ['--is', 'read-only', gw.uri('vol1')], { timeoutMs: 20_000 });
    assert.equal(rw.code, 2, rw.stderr);
  });

  it('fails to describe an export that does not exist', async () => {
    const r = await run('nbdinfo', ['--json', gw.uri('no-such-volume')], { timeoutMs: 20_000 });
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /unknown|not found|no such|not available/i);
  });
});
