import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { MemoryDevice } from '../../gateway/device/memory';
import { RequestLoop } from '../../gateway/nbd/request-loop';
import { silentLogger } from '../../gateway/util/log';
import { Cmd, NbdErr } from '../../protocol/nbd/constants';
import { decodeSimpleReply, encodeRequest } from '../../protocol/nbd/transmission';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-request-loop-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

describe('request loop', () => {
  it('answers a device that throws instead of rejecting with EIO, and serves the next request', async () => {
    const device = new MemoryDevice(1 << 20);
    const read = device.read.bind(device);
    device.read = (offset: number, buf: Buffer): Promise<void> => {
      if (offset === 0) throw new Error('thrown, not rejected');
      return read(offset, buf);
    };
    const sock = path.join(tmp, 's');
    const accepted: net.Socket[] = [];
    const server = net.createServer((socket) => {
      accepted.push(socket);
      const session = {
        export: { name: 'x', description: '', device },
        structuredReplies: false,
        baseAllocation: false,
        flags: 0,
        remainder: [],
      };
      const loop = new RequestLoop(socket, session, silentLogger);
      socket.on('data', (chunk: Buffer) => loop.onData(chunk));
      loop.start();
    });
    await new Promise<void>((resolve) => server.listen(sock, resolve));
    const client = net.connect(sock);
    const received: Buffer[] = [];
    client.on('data', (c: Buffer) => received.push(c));
    const request = Buffer.alloc(56);
    encodeRequest(
      { flags: 0, type: Cmd.READ, cookieHi: 0, cookieLo: 1, offset: 0, length: 4096 },
      request,
      0,
    );
    encodeRequest(
      { flags: 0, type: Cmd.READ, cookieHi: 0, cookieLo: 2, offset: 4096, length: 4096 },
      request,
      28,
    );
    client.write(request);
    // The error reply (16 bytes), then the good one with its data.
    for (let i = 0; i < 200 && Buffer.concat(received).length < 16 + 16 + 4096; i++)
      await new Promise((r) => setTimeout(r, 10));
    const bytes = Buffer.concat(received);
    const byCookie = new Map<number, number>();
    for (let at = 0; at < bytes.length;) {
      const r = decodeSimpleReply(bytes, at);
      byCookie.set(r.cookieLo, r.error);
      at += 16 + (r.error === 0 ? 4096 : 0); // a good READ reply carries its data
    }
    assert.equal(byCookie.get(1), NbdErr.EIO);
    assert.equal(byCookie.get(2), 0);
    client.destroy();
    for (const s of accepted) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
});
