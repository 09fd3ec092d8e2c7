// nbdcopy (libnbd) against the gateway: multi-connection copies in and out of
// a volume, including zeroing of holes and streaming to stdout.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Gateway } from '../helpers/gateway';
import {
  createVolume,
  MiB,
  peakConnections,
  scratchDir,
  sha256File,
  writeSparseImage,
} from '../helpers/fixtures';
import { check } from '../helpers/run';

const SIZE = 48 * MiB;

describe('nbdcopy against the gateway', () => {
  let gw: Gateway;
  let dir: string;
  let src: string;
  let srcHash: string;

  before(async () => {
    dir = scratchDir('nbdcopy');
    src = path.join(dir, 'src.img');
    writeSparseImage(src, SIZE);
    srcHash = sha256File(src);
    gw = await Gateway.start({ env: { BLOCKGATE_LOG: 'debug' } });
    await createVolume(gw, 'copy', '48M');
    // Garbage everywhere first: the copy must zero the source's holes.
    await check('qemu-io', ['-f', 'raw', gw.uri('copy'), '-c', `write -P 0xee 0 ${SIZE}`], {
      timeoutMs: 60_000,
    });
  });

  after(async () => {
    await gw?.destroy();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('copies a file into a volume over 4 connections and back out, hash equal both ways', async () => {
    await check('nbdcopy', ['-C', '4', '-T', '4', '--flush', src, gw.uri('copy')], { timeoutMs: 60_000 });
    // The export allows multi-conn, so nbdcopy really used 4 connections at once
    // (it uses no more connections than threads, hence -T 4 on 2 cores).
    assert.equal(peakConnections(gw.log, 'copy'), 4);

    const out = path.join(dir, 'out.img');
    await check('nbdcopy', ['-C', '4', '-T', '4', gw.uri('copy'), out], { timeoutMs: 60_000 });
    assert.equal(fs.statSync(out).size, SIZE);
    assert.equal(sha256File(out), srcHash);
  });

  it('streams a volume to stdout with the source hash', async () => {
    const r = await check(
      'bash',
      ['-o', 'pipefail', '-c', 'nbdcopy "$1" - | sha256sum', 'nbdcopy', gw.uri('copy')],
      {
        timeoutMs: 60_000,
      },
    );
    assert.equal(r.stdout.split(/\s+/)[0], srcHash);
  });

  it('a copy from a volume with one changed byte has a different hash', async () => {
    const changed = fs.readFileSync(src)[SIZE - 1]! ^ 0xff;
    await check('qemu-io', ['-f', 'raw', gw.uri('copy'), '-c', `write -P ${changed} ${SIZE - 1} 1`], {
      timeoutMs: 30_000,
    });
    const out = path.join(dir, 'changed.img');
    await check('nbdcopy', ['-C', '4', '-T', '4', gw.uri('copy'), out], { timeoutMs: 60_000 });
    assert.notEqual(sha256File(out), srcHash);
    const bytes = fs.readFileSync(out);
    assert.equal(bytes[SIZE - 1], changed);
    assert.ok(bytes.subarray(0, SIZE - 1).equals(fs.readFileSync(src).subarray(0, SIZE - 1)));
  });
});
