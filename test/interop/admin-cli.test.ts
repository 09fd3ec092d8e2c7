// The admin socket and the blockgate CLI: every command, its --json shape,
// and a clear one-line error with nothing changed for every bad request.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Gateway, BIN } from '../helpers/gateway';
import { RawClient } from '../helpers/raw-client';
import { check, run } from '../helpers/run';

let gw: Gateway;
before(async () => {
  gw = await Gateway.start();
});
after(async () => gw.destroy());

async function json(...args: string[]): Promise<unknown> {
  const r = await gw.cli(...args, '--json');
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout);
}

/** Sends raw lines to the admin socket and collects the first `n` replies. */
function adminLines(lines: string[], n: number): Promise<Array<Record<string, unknown>>> {
  return new Promise((resolve, reject) => {
    const s = net.connect(path.join(gw.dataDir, 'admin.sock'));
    let buf = '';
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error(`timed out; got: ${buf}`));
    }, 5000);
    s.on('connect', () => s.write(lines.join('')));
    s.on('data', (d) => {
      buf += d.toString();
      const got = buf.split('\n').filter(Boolean);
      if (got.length >= n) {
        clearTimeout(timer);
        s.destroy();
        resolve(got.slice(0, n).map((l) => JSON.parse(l) as Record<string, unknown>));
      }
    });
    s.on('error', reject);
  });
}

describe('volume commands', () => {
  it('creates the default 8 GiB volume disk0 on first start', async () => {
    const info = (await json('volume', 'info', 'disk0')) as {
      size: number;
      backend: string;
      readOnly: boolean;
    };
    assert.equal(info.size, 8 * 2 ** 30);
    assert.equal(info.backend, 'dedup');
    assert.equal(info.readOnly, false);
  });

  it('creates, lists, resizes and deletes a volume', async () => {
    const created = (await json('volume', 'create', 'v1', '--size', '64M', '--backend', 'memory')) as {
      name: string;
      size: number;
    };
    assert.deepEqual([created.name, created.size], ['v1', 64 * 2 ** 20]);
    const list = (await json('volume', 'list')) as Array<{ name: string }>;
    assert.deepEqual(
      list.map((v) => v.name),
      ['disk0', 'v1'],
    );
    const resized = (await json('volume', 'resize', 'v1', '--size', '128M')) as { size: number };
    assert.equal(resized.size, 128 * 2 ** 20);
    const r = await check('nbdinfo', ['--size', gw.uri('v1')]);
    assert.equal(r.stdout.trim(), String(128 * 2 ** 20));
    await json('volume', 'delete', 'v1');
    assert.deepEqual(
      ((await json('volume', 'list')) as Array<{ name: string }>).map((v) => v.name),
      ['disk0'],
    );
  });

  it('prints a human table for volume list', async () => {
    const r = await gw.cli('volume', 'list');
    assert.equal(r.code, 0);
    assert.match(r.stdout, /^NAME\s+SIZE\s+BACKEND\s+MODE\s+ALLOCATED\s+CLIENTS\n/);
    assert.match(r.stdout, /^disk0\s+8 GiB\s+dedup\s+rw/m);
  });

  const allocatedOf = async (name: string): Promise<number | undefined> =>
    ((await json('volume', 'list')) as Array<{ name: string; allocatedBytes: number }>).find(
      (v) => v.name === name,
    )?.allocatedBytes;
  const qemuIo = (uri: string, ...commands: string[]): Promise<unknown> =>
    check('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), uri]);

  it("lists a dedup volume's written data as allocated, zeroes and unwritten blocks not", async () => {
    await json('volume', 'create', 'alloc', '--size', '16M');
    await qemuIo(gw.uri('alloc'), 'write -P 0x61 0 64k', 'write -z 1M 64k');
    assert.equal(await allocatedOf('alloc'), 65536);
    const r = await gw.cli('volume', 'list');
    assert.match(r.stdout, /^alloc\s+16 MiB\s+dedup\s+rw\s+64 KiB/m);
    await json('volume', 'delete', 'alloc');
  });

  it("lists a memory volume's written 64 KiB pages as allocated, and a discarded page no more", async () => {
    await json('volume', 'create', 'mem', '--size', '16M', '--backend', 'memory');
    await qemuIo(gw.uri('mem'), 'write -P 0x61 0 64k', 'write -P 0x62 1M 4k');
    assert.equal(await allocatedOf('mem'), 2 * 65536);
    await qemuIo(gw.uri('mem'), 'discard 0 64k');
    assert.equal(await allocatedOf('mem'), 65536);
    await json('volume', 'delete', 'mem');
  });

  it("lists a raw volume on the operator's own sparse file by the file's written blocks", async () => {
    const file = path.join(gw.dataDir, 'operator.img');
    fs.writeFileSync(file, '');
    fs.truncateSync(file, 16 << 20);
    try {
      await json('volume', 'create', 'ext', '--size', '16M', '--backend', 'raw', '--path', file);
      assert.equal(await allocatedOf('ext'), 0);
      await qemuIo(gw.uri('ext'), 'write -P 0x61 4M 1M');
      assert.equal(await allocatedOf('ext'), fs.statSync(file).blocks * 512);
      assert.ok((await allocatedOf('ext'))! >= 1 << 20);
      await json('volume', 'delete', 'ext');
    } finally {
      fs.rmSync(file, { force: true });
    }
  });

  it("refuses a --size that differs from the operator's file, and creates nothing", async () => {
    const file = path.join(gw.dataDir, 'longer.img');
    fs.writeFileSync(file, Buffer.alloc(8 << 20, 0x5a));
    try {
      const r = await gw.cli('volume', 'create', 'short', '--size', '1M', '--backend', 'raw', '--path', file);
      assert.notEqual(r.code, 0);
      assert.match(r.stderr, /--size 1 MiB differs from the 8 MiB of .*longer\.img; leave it out/);
      assert.equal(await allocatedOf('short'), undefined);
      const ok = await gw.cli('volume', 'create', 'whole', '--backend', 'raw', '--path', file, '--json');
      assert.equal(ok.code, 0, ok.stderr);
      assert.equal((JSON.parse(ok.stdout) as { size: number }).size, 8 << 20);
      await json('volume', 'delete', 'whole');
      assert.ok(
        fs.readFileSync(file).every((x) => x === 0x5a),
        "the operator's file is untouched",
      );
    } finally {
      fs.rmSync(file, { force: true });
    }
  });

  it('reports gateway stats as JSON', async () => {
    const s = (await json('stats')) as { volumes: number; rssBytes: number; listeners: string[] };
    assert.ok(s.volumes >= 1);
    assert.ok(s.rssBytes > 0);
    assert.ok(s.listeners.some((l) => l.startsWith('unix:')));
  });
});

describe('bad admin input', () => {
  it('refuses a bad size with one line and creates nothing', async () => {
    const r = await gw.cli('volume', 'create', 'bad', '--size', '10Q');
    assert.notEqual(r.code, 0);
    assert.equal(r.stderr.trim().split('\n').length, 1);
    assert.match(r.stderr, /invalid size '10Q'/);
    assert.ok(!((await json('volume', 'list')) as Array<{ name: string }>).some((v) => v.name === 'bad'));
  });

  it('refuses a duplicate name and leaves the original alone', async () => {
    await json('volume', 'create', 'dup', '--size', '1M');
    const r = await gw.cli('volume', 'create', 'dup', '--size', '2M');
    assert.equal(r.code, 1);
    assert.match(r.stderr, /already exists/);
    assert.equal(((await json('volume', 'info', 'dup')) as { size: number }).size, 2 ** 20);
  });

  it('refuses an invalid volume name', async () => {
    const r = await gw.cli('volume', 'create', 'a@b', '--size', '1M');
    assert.equal(r.code, 1);
    assert.match(r.stderr, /invalid volume name/);
  });

  it('refuses to delete a volume with a connected client, and deletes it once they leave', async () => {
    await json('volume', 'create', 'busy', '--size', '1M');
    const c = await RawClient.connect(gw.socket);
    await c.go('busy');
    const r = await gw.cli('volume', 'delete', 'busy');
    assert.equal(r.code, 1);
    assert.match(r.stderr, /1 connected client/);
    assert.ok(((await json('volume', 'info', 'busy')) as { clients: number }).clients === 1);
    c.disconnect();
    await c.closedWithin();
    const deadline = Date.now() + 5000;
    let res = await gw.cli('volume', 'delete', 'busy');
    while (res.code !== 0 && Date.now() < deadline) {
      await new Promise((r2) => setTimeout(r2, 100));
      res = await gw.cli('volume', 'delete', 'busy');
    }
    assert.equal(res.code, 0, res.stderr);
  });

  it('answers an unknown CLI command with a usage error', async () => {
    const r = await gw.cli('frobnicate');
    assert.equal(r.code, 2);
    assert.equal(r.stderr.trim(), "blockgate: unknown command 'frobnicate' (try blockgate --help)");
  });

  it('answers an unknown option with a usage error', async () => {
    const r = await gw.cli('volume', 'list', '--bogus');
    assert.equal(r.code, 2);
    assert.match(r.stderr, /unknown option --bogus/);
  });

  it('answers an unknown admin command with ERR_UNKNOWN_COMMAND', async () => {
    const [res] = await adminLines([JSON.stringify({ id: 1, command: 'volume.explode' }) + '\n'], 1);
    assert.deepEqual(res!.error, {
      code: 'ERR_UNKNOWN_COMMAND',
      message: "unknown command 'volume.explode'",
    });
  });

  it('answers bad JSON with ERR_BAD_REQUEST and keeps the connection usable', async () => {
    const replies = await adminLines(['{not json\n', JSON.stringify({ id: 2, command: 'ping' }) + '\n'], 2);
    assert.equal((replies[0]!.error as { code: string }).code, 'ERR_BAD_REQUEST');
    assert.equal(replies[1]!.ok, true);
    assert.equal(replies[1]!.id, 2);
  });

  it('answers wrongly typed arguments with ERR_INVALID_ARGUMENT', async () => {
    const [res] = await adminLines(
      [JSON.stringify({ id: 3, command: 'volume.create', args: { name: 'x', size: true } }) + '\n'],
      1,
    );
    assert.equal((res!.error as { code: string }).code, 'ERR_INVALID_ARGUMENT');
  });

  it('keeps the admin socket private to its user', () => {
    assert.equal(fs.statSync(path.join(gw.dataDir, 'admin.sock')).mode & 0o777, 0o600);
  });

  it('says clearly when no gateway is running', async () => {
    const r = await run(process.execPath, [BIN, '--data', '/nonexistent-dir', 'stats']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /no gateway is running at \/nonexistent-dir\/admin.sock/);
  });
});
