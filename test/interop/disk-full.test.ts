// A full disk: writers get ENOSPC, nothing already acknowledged is lost,
// the gateway keeps serving, and writes succeed again once space returns.
// Each case puts a data directory on a small tmpfs it mounts (root only).

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, it } from 'node:test';
import { BIN, Gateway } from '../helpers/gateway';
import { check, run } from '../helpers/run';

const MiB = 1 << 20;
const canMount = process.getuid?.() === 0;

describe('a full disk', { skip: canMount ? false : 'needs root to mount a small tmpfs' }, () => {
  for (const backend of ['dedup', 'raw']) {
    it(`answers ENOSPC on a ${backend} volume, keeps flushed data, and recovers when space returns`, async () => {
      const mnt = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-full-'));
      const junk = path.join(os.tmpdir(), `blockgate-junk-${process.pid}-${backend}`);
      assert.equal(spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=40m', 'tmpfs', mnt]).status, 0);
      let gw: Gateway | null = null;
      try {
        const filler = path.join(mnt, 'filler');
        fs.writeFileSync(filler, Buffer.alloc(12 * MiB, 1)); // space to give back later
        gw = await Gateway.start({ dataDir: path.join(mnt, 'data') });
        assert.equal((await gw.cli('volume', 'create', 'v', '--size', '64M', '--backend', backend)).code, 0);
        const uri = gw.uri('v');
        // Flushed before the disk fills, and outside the range the fill writes.
        await check('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x5a 62M 2M', '-c', 'flush']);

        fs.writeFileSync(junk, crypto.randomBytes(60 * MiB)); // more than the disk holds
        const fill = await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', junk, uri], {
          timeoutMs: 60_000,
        });
        assert.notEqual(fill.code, 0, 'writing past the free space must fail');
        assert.match(fill.stderr, /No space left on device/);
        assert.match(gw.log, /ENOSPC/);

        await check('qemu-io', ['-f', 'raw', uri, '-c', 'read -P 0x5a 62M 2M']);

        fs.rmSync(filler);
        await check('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x6b 61M 1M', '-c', 'flush']);
        await check('qemu-io', ['-f', 'raw', uri, '-c', 'read -P 0x6b 61M 1M', '-c', 'read -P 0x5a 62M 2M']);
        assert.equal((await gw.stop()).code, 0);
        gw = null;
        // Writes that failed half-way must have left the store consistent.
        const fsck = await run(process.execPath, [BIN, 'fsck', '--data', path.join(mnt, 'data')], {
          timeoutMs: 60_000,
        });
        assert.equal(fsck.code, 0, fsck.stdout + fsck.stderr);
      } finally {
        await gw?.stop();
        fs.rmSync(junk, { force: true });
        spawnSync('umount', [mnt]);
        fs.rmSync(mnt, { recursive: true, force: true });
      }
    });
  }
});
