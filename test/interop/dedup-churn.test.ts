// Regression: random writes whose contents the store already holds (fio
// generates the same buffer sequence in every job) while overwrites release
// those very blocks. A block must never be shared at the moment a
// checkpoint deletes it: every read afterwards succeeds and fsck is clean.

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { BIN, Gateway } from '../helpers/gateway';
import { check, run } from '../helpers/run';

let gw: Gateway;
before(async () => {
  gw = await Gateway.start();
  assert.equal((await gw.cli('volume', 'create', 'churn', '--size', '256M', '--backend', 'dedup')).code, 0);
});
after(async () => gw.destroy());

function fio(name: string, rw: string, bs: string, depth: number, extra: string[] = []): Promise<unknown> {
  return check(
    'fio',
    [
      `--name=${name}`,
      '--ioengine=nbd',
      `--uri=${gw.uri('churn')}`,
      `--rw=${rw}`,
      `--bs=${bs}`,
      `--iodepth=${depth}`,
      '--size=256M',
      '--refill_buffers',
      '--buffer_compress_percentage=50',
      '--norandommap',
      '--verify_state_save=0',
      ...extra,
    ],
    { timeoutMs: 60_000 },
  );
}

describe('dedup store under churn', () => {
  it('serves every block after writes that re-share blocks being released', async () => {
    await fio('layout', 'write', '1M', 8);
    await fio('churn', 'randwrite', '4k', 32, ['--time_based', '--runtime=4']);
    await fio('readback', 'randread', '4k', 32, ['--time_based', '--runtime=2']);
    await fio('readall', 'read', '1M', 8);
    assert.doesNotMatch(gw.log, / error /);
    assert.equal((await gw.stop()).code, 0);
    const r = await run(process.execPath, [BIN, 'fsck', '--data', gw.dataDir], { timeoutMs: 60_000 });
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.match(r.stdout, /^clean$/m);
  });
});
