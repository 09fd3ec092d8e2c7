// fio's nbd engine (libnbd) against the gateway: concurrent verified random
// writes from two connections, then verified random reads on new ones.

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Gateway } from '../helpers/gateway';
import { createVolume, MiB, peakConnections } from '../helpers/fixtures';
import { run, RunResult } from '../helpers/run';

interface FioJob {
  jobname: string;
  error: number;
  read: { io_bytes: number };
  write: { io_bytes: number };
}

const PER_JOB = 32 * MiB;

/** Two jobs on two connections, each on its own 32 MiB of the volume. */
function fioArgs(uri: string, name: string, rw: string, ...extra: string[]): string[] {
  return [
    `--name=${name}`,
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${rw}`,
    '--bs=4k',
    '--iodepth=16',
    '--numjobs=2',
    `--size=${PER_JOB}`,
    `--offset_increment=${2 * PER_JOB}`,
    '--verify=crc32c',
    '--verify_fatal=1',
    '--randrepeat=1',
    '--output-format=json',
    // No verify state files left behind when a verification fails.
    '--verify_state_save=0',
    ...extra,
  ];
}

/** fio prints "connected to NBD server" lines before the JSON document. */
function jobs(r: RunResult): FioJob[] {
  const start = r.stdout.indexOf('\n{');
  const json = r.stdout.startsWith('{') ? r.stdout : r.stdout.slice(start + 1);
  return (JSON.parse(json) as { jobs: FioJob[] }).jobs;
}

describe('fio against the gateway', () => {
  let gw: Gateway;

  before(async () => {
    gw = await Gateway.start({ env: { BLOCKGATE_LOG: 'debug' } });
    await createVolume(gw, 'fio', '128M');
  });

  after(async () => {
    await gw?.destroy();
  });

  it('two jobs on two connections write randomly at depth 16 and verify with crc32c', async () => {
    const r = await run('fio', fioArgs(gw.uri('fio'), 'w', 'randwrite'), { timeoutMs: 90_000 });
    assert.equal(r.code, 0, `fio exited ${r.code ?? r.signal}\n${r.stdout.slice(-3000)}\n${r.stderr}`);
    assert.doesNotMatch(r.stderr, /verify|bad magic|crc32c/i);
    const js = jobs(r);
    assert.equal(js.length, 2);
    for (const j of js) {
      assert.equal(j.error, 0);
      assert.equal(j.write.io_bytes, PER_JOB);
      // The verify phase read everything back.
      assert.equal(j.read.io_bytes, PER_JOB);
    }
    // fio probes the size on short connections of its own, then each job keeps one.
    assert.equal(peakConnections(gw.log, 'fio'), 2);
  });

  it('random reads on new connections verify what was written', async () => {
    const r = await run('fio', fioArgs(gw.uri('fio'), 'w', 'randread'), { timeoutMs: 90_000 });
    assert.equal(r.code, 0, `fio exited ${r.code ?? r.signal}\n${r.stdout.slice(-3000)}\n${r.stderr}`);
    assert.doesNotMatch(r.stderr, /verify|bad magic|crc32c/i);
    for (const j of jobs(r)) {
      assert.equal(j.error, 0);
      assert.equal(j.read.io_bytes, PER_JOB);
      assert.equal(j.write.io_bytes, 0);
    }
  });

  it('random reads with verify notice a block changed behind their back', async () => {
    // The verification is real: overwrite one block of the second job's region.
    const victim = 2 * PER_JOB + 5 * MiB;
    const q = await run('qemu-io', ['-f', 'raw', gw.uri('fio'), '-c', `write -P 0x99 ${victim} 4k`], {
      timeoutMs: 30_000,
    });
    assert.equal(q.code, 0, q.stderr);
    const r = await run('fio', fioArgs(gw.uri('fio'), 'w', 'randread'), { timeoutMs: 90_000 });
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, new RegExp(`verify: bad magic header 9999.*offset ${victim}`));
  });
});
