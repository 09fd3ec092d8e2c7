// Every kind of bad input gets what the NBD spec asks for, a log line, and
// leaves the gateway serving everyone else.

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Cmd, CmdFlag, ChunkType, Info, NbdErr, Opt, Rep, Size } from '../../protocol/nbd/constants';
import { encodeInfoRequest, encodeMetaContextRequest, encodeOption } from '../../protocol/nbd/handshake';
import { Gateway } from '../helpers/gateway';
import { RawClient } from '../helpers/raw-client';
import { check } from '../helpers/run';

const SIZE = 1024 * 1024;
let gw: Gateway;

before(async () => {
  gw = await Gateway.start();
  for (const extra of [['small'], ['ro', '--read-only']]) {
    const r = await gw.cli('volume', 'create', ...extra, '--size', String(SIZE));
    assert.equal(r.code, 0, r.stderr);
  }
});
after(async () => gw.destroy());

/** Another client is still served normally. */
async function stillServing(): Promise<void> {
  await check(
    'qemu-io',
    ['-f', 'raw', gw.uri('small'), '-c', 'write -P 0x5a 0 4k', '-c', 'read -P 0x5a 0 4k'],
    {
      timeoutMs: 20_000,
    },
  );
}

async function session(exportName = 'small', structured = false): Promise<RawClient> {
  const c = await RawClient.connect(gw.socket);
  assert.equal(await c.go(exportName, structured), SIZE);
  return c;
}

describe('bad input during the handshake', () => {
  it('drops a client that sends unknown client flags', async () => {
    const c = await RawClient.connect(gw.socket);
    await c.greet(0x80);
    assert.ok(await c.closedWithin());
    await gw.waitForLog(/unknown client flags 0x80/);
    await stillServing();
  });

  it('drops a client whose option lacks the IHAVEOPT magic', async () => {
    const c = await RawClient.connect(gw.socket);
    await c.greet();
    c.send(Buffer.alloc(Size.OPTION_HEADER, 0x41));
    assert.ok(await c.closedWithin());
    await gw.waitForLog(/option request without IHAVEOPT/);
    await stillServing();
  });

  it('answers an unknown option with ERR_UNSUP and goes on negotiating', async () => {
    const c = await RawClient.connect(gw.socket);
    await c.greet();
    c.send(encodeOption(99));
    assert.equal((await c.optionReply()).type, Rep.ERR_UNSUP);
    c.send(encodeOption(Opt.LIST));
    const r = await c.optionReply();
    assert.equal(r.type, Rep.SERVER);
    c.destroy();
  });

  it('refuses STARTTLS by policy until TLS lands', async () => {
    const c = await RawClient.connect(gw.socket);
    await c.greet();
    c.send(encodeOption(Opt.STARTTLS));
    assert.equal((await c.optionReply()).type, Rep.ERR_POLICY);
    c.destroy();
  });

  it('answers an export name over 4096 bytes with ERR_TOO_BIG and goes on', async () => {
    const c = await RawClient.connect(gw.socket);
    await c.greet();
    c.send(encodeOption(Opt.GO, encodeInfoRequest({ name: 'x'.repeat(5000), requests: [] })));
    const r = await c.optionReply();
    assert.equal(r.type, Rep.ERR_TOO_BIG);
    assert.match(r.data.toString(), /exceeds 4096/);
    await gw.waitForLog(/export name of 5000 bytes exceeds 4096/);
    c.send(encodeOption(Opt.LIST));
    assert.equal((await c.optionReply()).type, Rep.SERVER, 'the stream is still aligned');
    c.destroy();
  });

  it('reads and refuses an option over 64 KiB, then still negotiates', async () => {
    const c = await RawClient.connect(gw.socket);
    await c.greet();
    c.send(encodeOption(Opt.INFO, Buffer.alloc(100 * 1024)));
    assert.equal((await c.optionReply()).type, Rep.ERR_TOO_BIG);
    c.send(encodeOption(Opt.GO, encodeInfoRequest({ name: 'small', requests: [Info.BLOCK_SIZE] })));
    let r = await c.optionReply();
    while (r.type === Rep.INFO) r = await c.optionReply();
    assert.equal(r.type, Rep.ACK);
    c.disconnect();
  });

  it('answers malformed option data with ERR_INVALID', async () => {
    const c = await RawClient.connect(gw.socket);
    await c.greet();
    const bad = encodeInfoRequest({ name: 'small', requests: [] });
    bad.writeUInt32BE(999, 0);
    c.send(encodeOption(Opt.INFO, bad));
    assert.equal((await c.optionReply()).type, Rep.ERR_INVALID);
    c.send(encodeOption(Opt.LIST, Buffer.from('junk')));
    assert.equal((await c.optionReply()).type, Rep.ERR_INVALID);
    c.destroy();
  });

  it('answers GO for a missing export with ERR_UNKNOWN', async () => {
    const c = await RawClient.connect(gw.socket);
    await c.greet();
    c.send(encodeOption(Opt.GO, encodeInfoRequest({ name: 'nope', requests: [] })));
    assert.equal((await c.optionReply()).type, Rep.ERR_UNKNOWN);
    c.destroy();
  });

  it('ends the session on EXPORT_NAME for a missing export', async () => {
    const c = await RawClient.connect(gw.socket);
    await c.greet();
    c.send(encodeOption(Opt.EXPORT_NAME, Buffer.from('nope')));
    assert.ok(await c.closedWithin());
  });

  it('refuses SET_META_CONTEXT before structured replies', async () => {
    const c = await RawClient.connect(gw.socket);
    await c.greet();
    c.send(
      encodeOption(
        Opt.SET_META_CONTEXT,
        encodeMetaContextRequest({ exportName: 'small', queries: ['base:allocation'] }),
      ),
    );
    assert.equal((await c.optionReply()).type, Rep.ERR_INVALID);
    c.destroy();
  });

  it('drops a client that negotiates a truncated handshake and vanishes', async () => {
    const c = await RawClient.connect(gw.socket);
    await c.greet();
    c.send(encodeOption(Opt.GO, encodeInfoRequest({ name: 'small', requests: [] })).subarray(0, 20));
    c.destroy();
    await stillServing();
  });
});

describe('bad input during transmission', () => {
  it('drops a client that sends a request with a bad magic, and serves others', async () => {
    const c = await session();
    c.send(Buffer.alloc(Size.REQUEST, 0x11));
    assert.ok(await c.closedWithin());
    await gw.waitForLog(/bad request magic/);
    await stillServing();
  });

  it('reads and discards a WRITE over 32 MiB, answers EINVAL, and keeps the connection', async () => {
    const c = await session();
    const len = 32 * 1024 * 1024 + 4096;
    c.request({ type: Cmd.WRITE, cookieLo: 7, offset: 0, length: len });
    const chunk = Buffer.alloc(1024 * 1024, 0xee);
    for (let sent = 0; sent < len; sent += chunk.length)
      c.send(chunk.subarray(0, Math.min(chunk.length, len - sent)));
    assert.deepEqual(await c.simpleReply(), { error: NbdErr.EINVAL, cookieLo: 7 });
    c.request({ type: Cmd.READ, cookieLo: 8, offset: 0, length: 512 });
    assert.deepEqual(await c.simpleReply(), { error: 0, cookieLo: 8 });
    await c.read(512);
    c.disconnect();
  });

  it('answers requests past the end: EINVAL for reads and trims, ENOSPC for writes', async () => {
    const c = await session();
    c.request({ type: Cmd.READ, cookieLo: 1, offset: SIZE - 512, length: 1024 });
    assert.deepEqual(await c.simpleReply(), { error: NbdErr.EINVAL, cookieLo: 1 });
    c.request({ type: Cmd.WRITE, cookieLo: 2, offset: SIZE }, Buffer.alloc(512));
    assert.deepEqual(await c.simpleReply(), { error: NbdErr.ENOSPC, cookieLo: 2 });
    c.request({ type: Cmd.TRIM, cookieLo: 3, offset: SIZE, length: 512 });
    assert.deepEqual(await c.simpleReply(), { error: NbdErr.EINVAL, cookieLo: 3 });
    c.request({ type: Cmd.WRITE_ZEROES, cookieLo: 4, offset: SIZE - 1, length: 2 });
    assert.deepEqual(await c.simpleReply(), { error: NbdErr.ENOSPC, cookieLo: 4 });
    c.request({ type: Cmd.READ, cookieLo: 5, offset: 2 ** 60, length: 1 });
    assert.deepEqual(await c.simpleReply(), { error: NbdErr.EINVAL, cookieLo: 5 });
    c.disconnect();
  });

  it('answers an unknown command and an unknown flag with EINVAL', async () => {
    const c = await session();
    c.request({ type: 42, cookieLo: 1 });
    assert.deepEqual(await c.simpleReply(), { error: NbdErr.EINVAL, cookieLo: 1 });
    c.request({ type: Cmd.FLUSH, cookieLo: 2, flags: 0x100 });
    assert.deepEqual(await c.simpleReply(), { error: NbdErr.EINVAL, cookieLo: 2 });
    c.request({ type: Cmd.READ, cookieLo: 3, flags: CmdFlag.DF, length: 512 });
    assert.deepEqual(
      await c.simpleReply(),
      { error: NbdErr.EINVAL, cookieLo: 3 },
      'DF needs structured replies',
    );
    c.request({ type: Cmd.BLOCK_STATUS, cookieLo: 4, length: 512 });
    assert.deepEqual(
      await c.simpleReply(),
      { error: NbdErr.EINVAL, cookieLo: 4 },
      'no meta context negotiated',
    );
    await gw.waitForLog(/unknown command 42/);
    c.disconnect();
  });

  it('refuses writes, trims and zeroes on a read-only volume with EPERM', async () => {
    const c = await session('ro');
    c.request({ type: Cmd.WRITE, cookieLo: 1 }, Buffer.alloc(512));
    assert.deepEqual(await c.simpleReply(), { error: NbdErr.EPERM, cookieLo: 1 });
    c.request({ type: Cmd.TRIM, cookieLo: 2, length: 512 });
    assert.deepEqual(await c.simpleReply(), { error: NbdErr.EPERM, cookieLo: 2 });
    c.request({ type: Cmd.WRITE_ZEROES, cookieLo: 3, length: 512 });
    assert.deepEqual(await c.simpleReply(), { error: NbdErr.EPERM, cookieLo: 3 });
    c.request({ type: Cmd.READ, cookieLo: 4, length: 512 });
    assert.deepEqual(await c.simpleReply(), { error: 0, cookieLo: 4 });
    await c.read(512);
    c.disconnect();
  });

  it('sends READ errors as structured ERROR chunks once negotiated', async () => {
    const c = await session('small', true);
    c.request({ type: Cmd.READ, cookieLo: 9, offset: SIZE, length: 512 });
    const chunk = await c.chunk();
    assert.equal(chunk.type, ChunkType.ERROR);
    assert.equal(chunk.cookieLo, 9);
    assert.equal(chunk.flags & 1, 1, 'DONE');
    assert.equal(chunk.payload.readUInt32BE(0), NbdErr.EINVAL);
    assert.match(chunk.payload.subarray(6).toString(), /past the end/);
    c.disconnect();
  });

  it('survives a client that vanishes in the middle of a WRITE payload', async () => {
    const c = await session();
    c.request({ type: Cmd.WRITE, cookieLo: 1, offset: 0, length: 65536 });
    c.send(Buffer.alloc(1000, 1));
    c.destroy();
    await stillServing();
  });

  it('finishes outstanding requests on DISC before closing', async () => {
    const c = await session();
    c.request({ type: Cmd.WRITE, cookieLo: 1, offset: 8192 }, Buffer.alloc(4096, 0x33));
    c.request({ type: Cmd.DISC, cookieLo: 2 });
    assert.deepEqual(await c.simpleReply(), { error: 0, cookieLo: 1 });
    assert.ok(await c.closedWithin());
    await check('qemu-io', ['-f', 'raw', gw.uri('small'), '-c', 'read -P 0x33 8192 4k'], {
      timeoutMs: 20_000,
    });
  });
});
