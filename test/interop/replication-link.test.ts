// The replication listener of the real gateway process: a peer with the
// cluster key gets an authenticated link; a wrong key, an oversized frame or
// an unknown message type is refused with a stable code and a log line, and
// NBD clients go on being served.

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { encodeFrame, Frame, FrameReader } from '../../protocol/replication/frames';
import { LinkProtocolError } from '../../protocol/replication/errors';
import { connectLink, Link, LinkRefusedError } from '../../gateway/replication/link';
import { Gateway } from '../helpers/gateway';
import { check, run } from '../helpers/run';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-link-'));
const keyFile = path.join(dir, 'cluster.key');
const key = crypto.randomBytes(32);
const peerId = crypto.randomBytes(16).toString('hex');

/** The next frame a link delivers, bounded in time. */
function nextFrame(link: Link, timeoutMs = 5000): Promise<Frame> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error('no frame in time')), timeoutMs);
    link.onFrame = (f) => {
      clearTimeout(t);
      resolve(f);
    };
  });
}

/** Connects a raw socket and collects every frame the gateway sends until it closes. */
function rawSession(port: number, send: (s: net.Socket, first: Frame) => void): Promise<Frame[]> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: '127.0.0.1', port });
    const reader = new FrameReader(1 << 20);
    const frames: Frame[] = [];
    const t = setTimeout(() => {
      s.destroy();
      reject(new Error(`gateway did not close the link; frames: ${JSON.stringify(frames)}`));
    }, 5000);
    s.on('data', (c: Buffer) => {
      reader.push(c);
      for (let f = reader.next(); f !== null; f = reader.next()) {
        frames.push(f);
        if (frames.length === 1) send(s, f);
      }
    });
    s.on('error', () => undefined);
    s.on('close', () => {
      clearTimeout(t);
      resolve(frames);
    });
  });
}

describe('replication link', () => {
  let gw: Gateway;
  let port: number;

  before(async () => {
    fs.writeFileSync(keyFile, key, { mode: 0o600 });
    gw = await Gateway.start({ args: ['--replication-listen', '127.0.0.1:0', '--cluster-key', keyFile] });
    port = Number(/replication: gateway [0-9a-f]{32} listening on 127\.0\.0\.1:(\d+)/.exec(gw.log)![1]);
  });
  after(async () => {
    await gw?.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('authenticates a peer holding the cluster key and answers its pings', async () => {
    const link = await connectLink('127.0.0.1', port, { gatewayId: peerId, key, maxFrame: 1 << 20 });
    assert.match(link.peerId, /^[0-9a-f]{32}$/);
    const reply = nextFrame(link);
    link.start();
    link.send({ ping: { seq: 41 } });
    assert.deepEqual(await reply, { pong: { seq: 41 } });
    link.close();
    await gw.waitForLog(new RegExp(`link from gateway ${peerId} at .* is up`));
  });

  it('refuses a peer with the wrong key with ERR_LINK_AUTH, and logs it', async () => {
    const wrong = crypto.randomBytes(32);
    // Proofs cross on the wire: the peer may see the mismatch first, or be told of it.
    await assert.rejects(
      connectLink('127.0.0.1', port, { gatewayId: peerId, key: wrong, maxFrame: 1 << 20 }),
      (e: unknown) =>
        (e instanceof LinkRefusedError && e.peerCode === 'ERR_LINK_AUTH') ||
        (e instanceof LinkProtocolError && e.code === 'ERR_LINK_AUTH'),
    );
    await gw.waitForLog(/refused: ERR_LINK_AUTH: peer does not hold the cluster key/);
  });

  it('refuses a frame over the limit before authentication', async () => {
    const frames = await rawSession(port, (s) => {
      const header = Buffer.alloc(4);
      header.writeUInt32BE(1 << 20, 0);
      s.write(header);
    });
    assert.equal(frames[0] && 'hello' in frames[0], true);
    assert.deepEqual(
      frames.slice(1).map((f) => ('error' in f ? f.error.code : '')),
      ['ERR_LINK_FRAME_TOO_LARGE'],
    );
    await gw.waitForLog(/refused: ERR_LINK_FRAME_TOO_LARGE/);
  });

  it('refuses a message type it does not know, on an authenticated link too', async () => {
    const link = await connectLink('127.0.0.1', port, { gatewayId: peerId, key, maxFrame: 1 << 20 });
    const reply = nextFrame(link);
    link.start();
    // Field 99 of Frame: a message from some future version.
    link.socket.write(Buffer.from([0, 0, 0, 3, 0x9a, 0x06, 0x00]));
    const f = await reply;
    assert.ok('error' in f && f.error.code === 'ERR_LINK_UNKNOWN_MESSAGE', JSON.stringify(f));
    await gw.waitForLog(/ERR_LINK_UNKNOWN_MESSAGE/);
  });

  it('refuses a peer that sends anything before its hello', async () => {
    const frames = await rawSession(port, (s) => s.write(encodeFrame({ ping: { seq: 1 } })));
    assert.deepEqual(
      frames.slice(1).map((f) => ('error' in f ? f.error.code : '')),
      ['ERR_LINK_UNEXPECTED'],
    );
  });

  it('goes on serving NBD clients after refusing links', async () => {
    const size = await check('nbdinfo', ['--size', gw.uri()]);
    assert.equal(size.stdout.trim(), String(8 * 1024 ** 3));
  });

  it('keeps a gateway from starting replication without a cluster key', async () => {
    const r = await run(process.execPath, [
      path.join(__dirname, '..', '..', '..', 'bin', 'blockgate'),
      'serve',
      '--data',
      path.join(dir, 'nokey'),
      '--replication-listen',
      '127.0.0.1:0',
    ]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /--replication-listen needs --cluster-key FILE/);
  });
});
