// Materialize: a dedup volume written in random order has its records
// scattered, so a cold sequential read issues a read per block; `volume info`
// says so, `materialize` (or the policy, past its threshold) rewrites the
// records in block order, and the contents stay exactly what they were.

import assert from 'node:assert/strict';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { fsckStore } from '../../gateway/store/fsck';
import { BIN, Gateway } from '../helpers/gateway';
import { createVolume } from '../helpers/fixtures';
import { check, run } from '../helpers/run';

/** Every block of the volume written once, in random order, with fresh data. */
async function scatter(gw: Gateway, volume: string, size: string): Promise<void> {
  await check(
    'fio',
    [
      '--name=scatter',
      '--ioengine=nbd',
      `--uri=${gw.uri(volume)}`,
      '--rw=randwrite',
      '--bs=4k',
      '--iodepth=16',
      `--size=${size}`,
      '--refill_buffers',
      '--randrepeat=0',
    ],
    { timeoutMs: 120_000 },
  );
}

async function contentHash(gw: Gateway, volume: string): Promise<string> {
  const r = await check('bash', ['-o', 'pipefail', '-c', 'nbdcopy "$1" - | sha256sum', 'x', gw.uri(volume)], {
    timeoutMs: 60_000,
  });
  return r.stdout.split(' ')[0]!;
}

async function fragmentation(gw: Gateway, volume: string): Promise<number> {
  const r = await gw.cli('volume', 'info', volume, '--json');
  assert.equal(r.code, 0, r.stderr);
  return (JSON.parse(r.stdout) as { dedup: { fragmentation: number } }).dedup.fragmentation;
}

describe('materialize', () => {
  let gw: Gateway | undefined;
  after(async () => {
    await gw?.destroy();
  });

  it('rewrites a scattered volume in block order, its contents unchanged', async () => {
    gw = await Gateway.start();
    await createVolume(gw, 'm', '16M');
    await scatter(gw, 'm', '16M');
    const before = await fragmentation(gw, 'm');
    assert.ok(before > 32, `a volume written in random order should be scattered, got ${before}`);
    const hash = await contentHash(gw, 'm');
    const r = await gw.cli('materialize', 'm', '--json');
    assert.equal(r.code, 0, r.stderr);
    const report = JSON.parse(r.stdout) as { before: number; after: number; movedBlocks: number };
    assert.equal(report.movedBlocks, 4096);
    assert.ok(report.after <= 1.5, `after materialize: ${report.after} reads per MiB`);
    assert.ok((await fragmentation(gw, 'm')) <= 1.5);
    assert.equal(await contentHash(gw, 'm'), hash);
    // The old copies are garbage now: compaction frees them and fsck finds nothing wrong.
    assert.equal((await gw.cli('compact')).code, 0);
    await gw.stop();
    assert.deepEqual(fsckStore(path.join(gw.dataDir, 'store')).problems, []);
    gw = await Gateway.start({ dataDir: gw.dataDir });
    assert.equal(await contentHash(gw, 'm'), hash);
  });

  it('leaves a volume already in order as it is', async () => {
    await createVolume(gw!, 'seq', '8M');
    await check(
      'fio',
      [
        '--name=seq',
        '--ioengine=nbd',
        `--uri=${gw!.uri('seq')}`,
        '--rw=write',
        '--bs=1M',
        '--size=8M',
        '--refill_buffers',
      ],
      { timeoutMs: 60_000 },
    );
    const r = await gw!.cli('materialize', 'seq', '--json');
    assert.equal(r.code, 0, r.stderr);
    assert.equal((JSON.parse(r.stdout) as { movedBlocks: number }).movedBlocks, 0);
  });

  it('refuses a volume that is not dedup, with a clear error', async () => {
    await createVolume(gw!, 'plain', '4M', '--backend', 'raw');
    const r = await gw!.cli('materialize', 'plain');
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /only dedup volumes are materialized/);
  });

  it('the policy materializes a volume past its threshold on its own', async () => {
    await gw!.destroy();
    gw = await Gateway.start({ args: ['--materialize-above', '4', '--materialize-every', '1'] });
    await createVolume(gw, 'p', '8M');
    await scatter(gw, 'p', '8M');
    await gw.waitForLog(/volume p materialized/, 30_000);
    // A round may have run while fio still wrote; the next ones finish the job.
    const deadline = Date.now() + 30_000;
    while ((await fragmentation(gw, 'p')) > 1.5) {
      assert.ok(Date.now() < deadline, 'the policy never brought the volume below its threshold');
      await new Promise((r) => setTimeout(r, 500));
    }
  });

  it('refuses a bad threshold at start', async () => {
    const r = await run(process.execPath, [BIN, 'serve', '--materialize-above', '0'], { timeoutMs: 10_000 });
    assert.equal(r.code, 2);
    assert.match(r.stderr, /--materialize-above takes reads per MiB/);
  });
});
