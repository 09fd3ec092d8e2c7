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
import {
  connectLink,
  establish,
  LARGEST_FRAME,
  Link,
  LinkRefusedError,
} from '../../gateway/replication/link';
import { Gateway } from '../helpers/gateway';
import { BlockHasher } from '../../gateway/store/block-codec';
import { clusterSecret, contentDomain } from '../../gateway/store/dedup-store';
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

  it('refuses a primary that takes smaller frames than a replica answers with', async () => {
    await assert.rejects(
      connectLink('127.0.0.1', port, { gatewayId: peerId, key, maxFrame: 64 * 1024 }),
      (e: unknown) => e instanceof LinkRefusedError && e.peerCode === 'ERR_LINK_FRAME_TOO_LARGE',
    );
    await gw.waitForLog(/refused: ERR_LINK_FRAME_TOO_LARGE: peer takes frames of up to 65536 bytes/);
  });

  it('as a primary, refuses a replica that takes smaller frames than its largest batch', async () => {
    const replicaSide: Array<Promise<unknown>> = [];
    const server = net.createServer((socket) => {
      const me = { gatewayId: crypto.randomBytes(16).toString('hex'), key, maxFrame: 1 << 20 };
      replicaSide.push(establish(socket, 'acceptor', me).catch((e: unknown) => e));
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    try {
      const { port: small } = server.address() as net.AddressInfo;
      await assert.rejects(
        connectLink('127.0.0.1', small, { gatewayId: peerId, key, maxFrame: 64 << 20 }),
        (e: unknown) =>
          e instanceof LinkProtocolError &&
          e.code === 'ERR_LINK_FRAME_TOO_LARGE' &&
          e.message.includes(`this gateway's can be ${LARGEST_FRAME.connector}`),
      );
      const refused = await replicaSide[0];
      assert.ok(refused instanceof LinkRefusedError && refused.peerCode === 'ERR_LINK_FRAME_TOO_LARGE');
    } finally {
      server.close();
    }
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

  /** An authenticated peer that opens a mirror of `volume`; resolves with the gateway's answer. */
  async function mirrorPeer(
    volume: string,
    domain: Buffer,
    generation = 1,
  ): Promise<{ link: Link; answer: Frame }> {
    const link = await connectLink('127.0.0.1', port, { gatewayId: peerId, key, maxFrame: 1 << 20 });
    const answer = nextFrame(link);
    link.start();
    link.send({ mirror: { volume, size: 1 << 20, domain, generation } });
    return { link, answer: await answer };
  }

  const domain = contentDomain(clusterSecret(key));
  /** A block of the given byte, named by the cluster's content id. */
  function cidOf(byte: number): Buffer {
    return new BlockHasher(clusterSecret(key)).hash(Buffer.alloc(4096, byte));
  }

  it('refuses a batch before any mirror frame names its volume', async () => {
    const link = await connectLink('127.0.0.1', port, { gatewayId: peerId, key, maxFrame: 1 << 20 });
    const reply = nextFrame(link);
    link.start();
    link.send({
      batch: {
        seq: 1,
        durable: false,
        extents: [{ lba: 0, kinds: Buffer.from([1]), cids: Buffer.alloc(0) }],
      },
    });
    const f = await reply;
    assert.ok('error' in f && f.error.code === 'ERR_LINK_UNKNOWN_VOLUME', JSON.stringify(f));
  });

  it('refuses a mirror from a store whose content ids are of another domain', async () => {
    const { answer } = await mirrorPeer('m-domain', crypto.randomBytes(16));
    assert.ok('error' in answer && answer.error.code === 'ERR_LINK_DOMAIN', JSON.stringify(answer));
    await gw.waitForLog(/ERR_LINK_DOMAIN/);
  });

  it('tells a mirror of an older generation than a primary volume here that it is superseded', async () => {
    const { answer } = await mirrorPeer('disk0', domain, 0);
    assert.deepEqual(answer, { superseded: { volume: 'disk0', generation: 1 } });
  });

  it('refuses a mirror over a primary volume of the same generation here, without superseding it', async () => {
    const { answer } = await mirrorPeer('disk0', domain);
    assert.ok('error' in answer && answer.error.code === 'ERR_LINK_NOT_REPLICA', JSON.stringify(answer));
  });

  it('refuses a block that does not match its content id, and changes nothing', async () => {
    const { link, answer } = await mirrorPeer('m-bad', domain);
    assert.deepEqual(answer, { mirrorReady: { volume: 'm-bad', seeded: false } });
    // A good batch first: block 0 becomes 0x61s.
    let next = nextFrame(link);
    link.send({
      batch: { seq: 1, durable: true, extents: [{ lba: 0, kinds: Buffer.from([2]), cids: cidOf(0x61) }] },
    });
    assert.deepEqual(await next, { need: { seq: 1, ordinals: [0] } });
    next = nextFrame(link);
    link.send({
      blocks: { seq: 1, blocks: [{ ordinal: 0, lz4: false, payload: Buffer.alloc(4096, 0x61) }] },
    });
    assert.deepEqual(await next, { ack: { seq: 1 } });
    // Then one whose block 1 carries other bytes than its id names: nothing of it may land.
    next = nextFrame(link);
    const kinds = Buffer.from([2, 2]);
    link.send({
      batch: {
        seq: 2,
        durable: true,
        extents: [{ lba: 0, kinds, cids: Buffer.concat([cidOf(0x62), cidOf(0x63)]) }],
      },
    });
    assert.deepEqual(await next, { need: { seq: 2, ordinals: [0, 1] } });
    next = nextFrame(link);
    link.send({
      blocks: {
        seq: 2,
        blocks: [
          { ordinal: 0, lz4: false, payload: Buffer.alloc(4096, 0x62) },
          { ordinal: 1, lz4: false, payload: Buffer.alloc(4096, 0x64) },
        ],
      },
    });
    const f = await next;
    assert.ok('error' in f && f.error.code === 'ERR_LINK_BAD_BLOCK', JSON.stringify(f));
    await gw.waitForLog(/mirror of m-bad from gateway [0-9a-f]+: ERR_LINK_BAD_BLOCK/);
    const read = await check('qemu-io', [
      '-r',
      '-f',
      'raw',
      '-c',
      'read -P 0x61 0 4k',
      '-c',
      'read -P 0 4k 4k',
      gw.uri('m-bad'),
    ]);
    assert.doesNotMatch(read.stdout, /Pattern verification failed/);
  });

  it('applies blocks sent with a batch without asking for them', async () => {
    const { link, answer } = await mirrorPeer('m-inline', domain);
    assert.deepEqual(answer, { mirrorReady: { volume: 'm-inline', seeded: false } });
    const next = nextFrame(link);
    link.send({
      batch: {
        seq: 1,
        durable: true,
        extents: [{ lba: 0, kinds: Buffer.from([2]), cids: cidOf(0x71) }],
        blocks: [{ ordinal: 0, lz4: false, payload: Buffer.alloc(4096, 0x71) }],
      },
    });
    assert.deepEqual(await next, { ack: { seq: 1 } });
    const read = await check('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x71 0 4k', gw.uri('m-inline')]);
    assert.doesNotMatch(read.stdout, /Pattern verification failed/);
  });

  it('refuses a block sent with a batch that does not match its content id, or is not in it', async () => {
    for (const [name, block, code] of [
      ['m-inline-bad', { ordinal: 0, lz4: false, payload: Buffer.alloc(4096, 0x73) }, 'ERR_LINK_BAD_BLOCK'],
      ['m-inline-far', { ordinal: 5, lz4: false, payload: Buffer.alloc(4096, 0x72) }, 'ERR_LINK_MALFORMED'],
    ] as const) {
      const { link } = await mirrorPeer(name, domain);
      const next = nextFrame(link);
      link.send({
        batch: {
          seq: 1,
          durable: true,
          extents: [{ lba: 0, kinds: Buffer.from([2]), cids: cidOf(0x72) }],
          blocks: [block],
        },
      });
      const f = await next;
      assert.ok('error' in f && f.error.code === code, `${name}: ${JSON.stringify(f)}`);
      const read = await check('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0 0 4k', gw.uri(name)]);
      assert.doesNotMatch(read.stdout, /Pattern verification failed/);
    }
  });

  it('compares a slice of chunks a verify names, and refuses one past the volume', async () => {
    const { link, answer } = await mirrorPeer('m-verify', domain);
    assert.deepEqual(answer, { mirrorReady: { volume: 'm-verify', seeded: false } });
    // The 1 MiB volume is one chunk; no digest is all zeroes.
    let next = nextFrame(link);
    link.send({ verifyChunks: { seq: 1, first: 0, digests: Buffer.alloc(32) } });
    assert.deepEqual(await next, { verifyChunksResult: { seq: 1, mismatched: [0] } });
    next = nextFrame(link);
    link.send({ verifyChunks: { seq: 2, first: 1, digests: Buffer.alloc(32) } });
    const f = await next;
    assert.ok('error' in f && f.error.code === 'ERR_LINK_MALFORMED', JSON.stringify(f));
  });

  it('scrubs the blocks a scrub names, and refuses a range past the volume', async () => {
    const { link } = await mirrorPeer('m-scrub', domain);
    // The 1 MiB volume is 256 blocks, none written: nothing to find damaged.
    let next = nextFrame(link);
    link.send({ scrubBlocks: { seq: 1, lba: 0, count: 256 } });
    assert.deepEqual(await next, { scrubBlocksResult: { seq: 1, damaged: [] } });
    next = nextFrame(link);
    link.send({ scrubBlocks: { seq: 2, lba: 200, count: 57 } });
    const f = await next;
    assert.ok('error' in f && f.error.code === 'ERR_LINK_MALFORMED', JSON.stringify(f));
  });

  it('answers a fetch with the blocks it stores, and refuses one past the volume or over the limit', async () => {
    const { link } = await mirrorPeer('m-fetch', domain);
    // Nothing written: holes are left out of the answer.
    let next = nextFrame(link);
    link.send({ fetchBlocks: { seq: 1, lbas: [0, 5] } });
    assert.deepEqual(await next, { blocks: { seq: 1, blocks: [] } });
    for (const lbas of [[256], Array.from({ length: 129 }, (_v, i) => i)]) {
      const { link: other } = await mirrorPeer('m-fetch', domain);
      next = nextFrame(other);
      other.send({ fetchBlocks: { seq: 2, lbas } });
      const f = await next;
      assert.ok('error' in f && f.error.code === 'ERR_LINK_MALFORMED', JSON.stringify(f));
    }
  });

  it('does not apply a batch still waiting for its blocks when the copy is promoted meanwhile', async () => {
    const { link, answer } = await mirrorPeer('m-promoted', domain);
    assert.deepEqual(answer, { mirrorReady: { volume: 'm-promoted', seeded: false } });
    let next = nextFrame(link);
    link.send({
      batch: { seq: 1, durable: true, extents: [{ lba: 0, kinds: Buffer.from([2]), cids: cidOf(0x81) }] },
    });
    assert.deepEqual(await next, { need: { seq: 1, ordinals: [0] } });
    // The batch waits for its block; the copy here becomes the primary first.
    const promoted = await gw.cli('promote', 'm-promoted');
    assert.equal(promoted.code, 0, promoted.stderr);
    next = nextFrame(link);
    link.send({
      blocks: { seq: 1, blocks: [{ ordinal: 0, lz4: false, payload: Buffer.alloc(4096, 0x81) }] },
    });
    const f = await next;
    assert.deepEqual(f, { superseded: { volume: 'm-promoted', generation: 2 } });
    const read = await check('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0 0 4k', gw.uri('m-promoted')]);
    assert.doesNotMatch(read.stdout, /Pattern verification failed/);
  });

  it('drops the queue of a link replaced by a newer one for the same volume', async () => {
    const first = await mirrorPeer('m-stale', domain);
    assert.deepEqual(first.answer, { mirrorReady: { volume: 'm-stale', seeded: false } });
    const need = nextFrame(first.link);
    first.link.send({
      batch: { seq: 1, durable: true, extents: [{ lba: 0, kinds: Buffer.from([2]), cids: cidOf(0x91) }] },
    });
    assert.deepEqual(await need, { need: { seq: 1, ordinals: [0] } });
    // The primary gave up on that link and opened another: the old one's batch must not land.
    const second = await mirrorPeer('m-stale', domain);
    assert.deepEqual(second.answer, { mirrorReady: { volume: 'm-stale', seeded: false } });
    first.link.send({
      blocks: { seq: 1, blocks: [{ ordinal: 0, lz4: false, payload: Buffer.alloc(4096, 0x91) }] },
    });
    const ack = nextFrame(second.link);
    second.link.send({
      batch: { seq: 1, durable: true, extents: [{ lba: 1, kinds: Buffer.from([2]), cids: cidOf(0x92) }] },
    });
    const f = await ack;
    if ('need' in f) {
      const done = nextFrame(second.link);
      second.link.send({
        blocks: { seq: 1, blocks: [{ ordinal: 0, lz4: false, payload: Buffer.alloc(4096, 0x92) }] },
      });
      assert.deepEqual(await done, { ack: { seq: 1 } });
    } else assert.deepEqual(f, { ack: { seq: 1 } });
    const read = await check('qemu-io', [
      '-r',
      '-f',
      'raw',
      '-c',
      'read -P 0 0 4k',
      '-c',
      'read -P 0x92 4k 4k',
      gw.uri('m-stale'),
    ]);
    assert.doesNotMatch(read.stdout, /Pattern verification failed/);
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
