// The gateway as a process: what survives a restart, one gateway per data
// directory, clean shutdown under load, and one shared state for all
// connections of an export (multi-conn).

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, it } from 'node:test';
import { HEAP_FLAGS } from '../../gateway/util/heap-flags';
import { Cmd } from '../../protocol/nbd/constants';
import { BIN, Gateway } from '../helpers/gateway';
import { RawClient } from '../helpers/raw-client';
import { check, run } from '../helpers/run';

describe('gateway lifecycle', () => {
  it('keeps volumes and their data across a restart', async () => {
    const gw = await Gateway.start();
    try {
      assert.equal((await gw.cli('volume', 'create', 'keep', '--size', '16M', '--read-only')).code, 0);
      assert.equal((await gw.cli('volume', 'create', 'data', '--size', '16M')).code, 0);
      await check('qemu-io', ['-f', 'raw', gw.uri('data'), '-c', 'write -P 0x42 1M 64k']);
      assert.deepEqual(await gw.stop(), { code: 0, signal: null });
      const again = await Gateway.start({ dataDir: gw.dataDir });
      try {
        const info = JSON.parse((await again.cli('volume', 'info', 'keep', '--json')).stdout) as {
          size: number;
          readOnly: boolean;
        };
        assert.deepEqual([info.size, info.readOnly], [16 * 2 ** 20, true]);
        await check('qemu-io', ['-f', 'raw', again.uri('data'), '-c', 'read -P 0x42 1M 64k']);
      } finally {
        await again.stop();
      }
    } finally {
      await gw.destroy();
    }
  });

  it('runs with its heap flags, under the process id it was started with', async () => {
    const gw = await Gateway.start();
    try {
      const cmdline = fs.readFileSync(`/proc/${gw.proc.pid}/cmdline`, 'utf8').split('\0');
      for (const flag of HEAP_FLAGS) {
        const at = cmdline.indexOf(flag);
        assert.ok(at > 0 && at < cmdline.indexOf(BIN), `${flag} given to node in ${cmdline.join(' ')}`);
      }
      assert.doesNotMatch(gw.log, /running without/);
      await check('nbdinfo', ['--size', gw.uri()]);
    } finally {
      await gw.destroy();
    }
  });

  it("keeps the operator's own value of a heap flag", async () => {
    const gw = await Gateway.start({ nodeArgs: ['--initial-old-space-size=32'] });
    try {
      const cmdline = fs.readFileSync(`/proc/${gw.proc.pid}/cmdline`, 'utf8').split('\0');
      assert.deepEqual(
        cmdline.filter((a) => a.startsWith('--initial-old-space-size')),
        ['--initial-old-space-size=32'],
      );
      await check('nbdinfo', ['--size', gw.uri()]);
    } finally {
      await gw.destroy();
    }
  });

  it('runs under --cpu-prof without executing itself again, and writes its profile on SIGTERM', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bg-prof-'));
    try {
      const gw = await Gateway.start({ nodeArgs: ['--cpu-prof', `--cpu-prof-dir=${dir}`] });
      try {
        assert.match(
          gw.log,
          /running without --initial-old-space-size=64: not re-executing under a CPU profiler/,
        );
        await check('nbdinfo', ['--size', gw.uri()]);
        assert.deepEqual(await gw.stop(), { code: 0, signal: null });
      } finally {
        await gw.destroy();
      }
      assert.ok(
        fs.readdirSync(dir).some((f) => f.endsWith('.cpuprofile')),
        'a profile was written',
      );
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refuses a second gateway on the same data directory at once', async () => {
    const gw = await Gateway.start();
    try {
      const r = await run(
        process.execPath,
        [BIN, 'serve', '--data', gw.dataDir, '--listen', 'unix:/tmp/unused.sock'],
        {
          timeoutMs: 10_000,
        },
      );
      assert.equal(r.code, 1);
      assert.match(r.stderr, /is in use by another gateway \(pid \d+\)/);
      await check('nbdinfo', ['--size', gw.uri()]);
    } finally {
      await gw.destroy();
    }
  });

  it('refuses a malformed --listen address with a usage error', async () => {
    const r = await run(process.execPath, [BIN, 'serve', '--data', '/tmp/x', '--listen', 'nowhere']);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /--listen: 'nowhere' is not HOST:PORT or unix:PATH/);
  });

  it('refuses a malformed size option of serve with a usage error naming it', async () => {
    for (const [option, value, message] of [
      ['--mirror-buffer', 'abc', /--mirror-buffer: invalid size 'abc'/],
      ['--mirror-buffer', '1', /--mirror-buffer takes a size of at least 4K/],
      ['--hash-pool', '12Q', /--hash-pool: invalid size '12Q'/],
      ['--meta-cache', 'lots', /--meta-cache: invalid size 'lots'/],
    ] as const) {
      const r = await run(process.execPath, [BIN, 'serve', '--data', '/tmp/x', option, value]);
      assert.equal(r.code, 2, r.stderr);
      assert.match(r.stderr, message);
    }
  });

  it('finishes in-flight requests and exits 0 on SIGTERM under load', async () => {
    const gw = await Gateway.start();
    try {
      const fio = spawn(
        'fio',
        [
          '--name=load',
          // Jobs as threads: SIGKILL to fio then ends the job too (a forked job process
          // outlived it, stuck forever).
          '--thread',
          '--ioengine=nbd',
          `--uri=${gw.uri()}`,
          '--rw=randwrite',
          '--bs=64k',
          '--iodepth=16',
          '--size=64M',
          '--time_based',
          '--runtime=20',
        ],
        { stdio: 'ignore' },
      );
      await new Promise((r) => setTimeout(r, 1500));
      const status = await gw.stop('SIGTERM');
      fio.kill('SIGKILL');
      assert.deepEqual(status, { code: 0, signal: null });
      assert.match(gw.log, /stopped cleanly/);
    } finally {
      await gw.destroy();
    }
  });

  it('serves the same state to every connection of an export (multi-conn)', async () => {
    const gw = await Gateway.start();
    try {
      const a = await RawClient.connect(gw.socket);
      const b = await RawClient.connect(gw.socket);
      await a.go('disk0');
      await b.go('disk0');
      a.request({ type: Cmd.WRITE, cookieLo: 1, offset: 4096 }, Buffer.alloc(4096, 0x77));
      assert.equal((await a.simpleReply()).error, 0);
      b.request({ type: Cmd.FLUSH, cookieLo: 2 });
      assert.equal((await b.simpleReply()).error, 0);
      b.request({ type: Cmd.READ, cookieLo: 3, offset: 4096, length: 4096 });
      assert.equal((await b.simpleReply()).error, 0);
      assert.ok((await b.read(4096)).every((x) => x === 0x77));
      a.disconnect();
      b.disconnect();
    } finally {
      await gw.destroy();
    }
  });

  it('listens on TCP as well as Unix sockets', async () => {
    const gw = await Gateway.start({ listen: ['127.0.0.1:0'] });
    try {
      const port = /listening on 127\.0\.0\.1:(\d+)/.exec(gw.log)?.[1];
      assert.ok(port, gw.log);
      const r = await check('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/disk0`]);
      assert.equal(r.stdout.trim(), String(8 * 2 ** 30));
    } finally {
      await gw.destroy();
    }
  });
});
