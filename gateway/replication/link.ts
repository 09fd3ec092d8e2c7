// One replication link: the authentication handshake of link.proto on a
// fresh socket, then frames both ways. Whatever breaks the protocol (a frame
// over the limit, a message this gateway does not know, a wrong key) is told
// to the peer in an Error frame with a stable code, and the link is closed.

import crypto from 'node:crypto';
import net from 'node:net';
import { LinkProtocolError } from '../../protocol/replication/errors';
import {
  encodeFrame,
  encodeFrameParts,
  Frame,
  FrameReader,
  frameKind,
  LINK_VERSION,
} from '../../protocol/replication/frames';
import { BLOCK_SIZE } from '../nbd/export-flags';
import { sharedLookup } from '../util/shared-lookup';

/** Every outgoing link's name lookups: one in flight per host name (shared-lookup.ts). */
const hostLookup = sharedLookup();

/** Nothing bigger is read from a peer that has not authenticated. */
const PRE_AUTH_LIMIT = 64 * 1024;
const NONCE_BYTES = 32;
export const HANDSHAKE_TIMEOUT_MS = 10_000;
/** After an Error frame, the peer gets this long to read it before the socket is destroyed. */
const LINGER_MS = 1000;

export type Role = 'connector' | 'acceptor';

/**
 * The longest frame each side may send. The connector is a primary: its batch (or its
 * Blocks answer to a Need) can carry a client's largest write with every block inline,
 * under 64 bytes of extent and framing per block; a batch of several writes stops at
 * 1024 blocks. The acceptor is a replica: acknowledgements, Needs (an ordinal per block of
 * a batch) and verify answers, tens of KiB at most. A peer that takes less than this side
 * sends is refused at the handshake: met on the first large write instead, its refusal of
 * the frame would drop the link, and every reconnection would fail the same way.
 */
export const LARGEST_FRAME: Readonly<Record<Role, number>> = {
  connector: BLOCK_SIZE.maximum + (BLOCK_SIZE.maximum / 4096) * 64 + 64 * 1024,
  acceptor: 1024 * 1024,
};

export interface LinkIdentity {
  gatewayId: string;
  key: Buffer;
  /** Longest frame this gateway accepts once a peer has authenticated. */
  maxFrame: number;
}

/** The peer refused the link, in an Error frame. */
export class LinkRefusedError extends Error {
  override readonly name = 'LinkRefusedError';
  readonly code = 'ERR_LINK_REFUSED';
  constructor(
    readonly peerCode: string,
    message: string,
  ) {
    super(`peer refused the link: ${peerCode}: ${message}`);
  }
}

function proof(
  key: Buffer,
  role: Role,
  senderNonce: Buffer,
  receiverNonce: Buffer,
  senderId: string,
): Buffer {
  return crypto
    .createHmac('sha256', key)
    .update('blockgate-link-v1\0')
    .update(`${role}\0`)
    .update(senderNonce)
    .update(receiverNonce)
    .update(senderId)
    .digest();
}

/** Sends an Error frame, then closes: the peer learns why. */
function refuse(socket: net.Socket, err: LinkProtocolError): void {
  if (socket.destroyed) return;
  socket.end(encodeFrame({ error: { code: err.code, message: err.message } }));
  setTimeout(() => socket.destroy(), LINGER_MS).unref();
}

/** An authenticated link. Frames arrive in onFrame; protocol errors close it after telling the peer. */
export class Link {
  onFrame: (frame: Frame) => void = () => undefined;
  onError: (err: Error) => void = () => undefined;

  constructor(
    readonly socket: net.Socket,
    readonly peerId: string,
    /** The longest frame the peer accepts. */
    readonly peerMaxFrame: number,
    private readonly reader: FrameReader,
  ) {
    socket.on('error', (err) => this.onError(err));
    // Batches, Needs and Acks are small frames answered by the peer: with Nagle's
    // algorithm each waited for the peer's delayed ACK (tens of ms a round trip).
    socket.setNoDelay(true);
  }

  /** Starts delivering frames, those already received first. */
  start(): void {
    this.socket.on('data', (chunk: Buffer) => {
      this.reader.push(chunk);
      this.pump();
    });
    this.pump();
    this.socket.resume();
  }

  private pump(): void {
    try {
      for (let f = this.reader.next(); f !== null; f = this.reader.next()) {
        if (this.socket.destroyed) return;
        this.onFrame(f);
      }
    } catch (err) {
      if (!(err instanceof LinkProtocolError)) throw err;
      this.fail(err);
    }
  }

  /** Bytes written to the peer so far, length prefixes included. */
  bytesOut = 0;

  send(frame: Frame): boolean {
    const parts = encodeFrameParts(frame);
    // Corked: the parts go to the kernel in one writev.
    this.socket.cork();
    let more = true;
    for (const p of parts) {
      this.bytesOut += p.length;
      more = this.socket.write(p);
    }
    this.socket.uncork();
    return more;
  }

  /** Closes the link on a protocol error, telling the peer its code. */
  fail(err: LinkProtocolError): void {
    this.onError(err);
    refuse(this.socket, err);
  }

  close(): void {
    this.socket.end();
  }
}

/**
 * The handshake on a connected socket: resolves with the authenticated link, or
 * rejects (LinkProtocolError, LinkRefusedError) after telling the peer and closing.
 */
export function establish(
  socket: net.Socket,
  role: Role,
  me: LinkIdentity,
  timeoutMs = HANDSHAKE_TIMEOUT_MS,
): Promise<Link> {
  return new Promise((resolve, reject) => {
    const reader = new FrameReader(PRE_AUTH_LIMIT);
    const nonce = crypto.randomBytes(NONCE_BYTES);
    const peerRole: Role = role === 'connector' ? 'acceptor' : 'connector';
    let peer: { id: string; nonce: Buffer; maxFrame: number } | null = null;
    let settled = false;

    const finish = (err: Error | null, link?: Link): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('close', onClose);
      socket.off('error', onSocketError);
      if (err) {
        if (err instanceof LinkProtocolError) refuse(socket, err);
        else socket.destroy();
        reject(err);
      } else {
        // Held until the link's owner starts it: nothing read in between may be lost.
        socket.pause();
        resolve(link!);
      }
    };
    const handle = (f: Frame): void => {
      if ('error' in f) throw new LinkRefusedError(f.error.code, f.error.message);
      if (peer === null) {
        if (!('hello' in f))
          throw new LinkProtocolError('ERR_LINK_UNEXPECTED', `${frameKind(f)} before hello`);
        const h = f.hello;
        if (h.version !== LINK_VERSION)
          throw new LinkProtocolError(
            'ERR_LINK_VERSION',
            `link version ${h.version}; this gateway speaks ${LINK_VERSION}`,
          );
        if (h.nonce.length !== NONCE_BYTES)
          throw new LinkProtocolError('ERR_LINK_MALFORMED', `hello nonce of ${h.nonce.length} bytes`);
        if (!/^[0-9a-f]{32}$/.test(h.gatewayId))
          throw new LinkProtocolError('ERR_LINK_MALFORMED', 'hello without a gateway id');
        if (h.gatewayId === me.gatewayId)
          throw new LinkProtocolError('ERR_LINK_AUTH', "peer claims this gateway's own identity");
        if (h.maxFrame < LARGEST_FRAME[role])
          throw new LinkProtocolError(
            'ERR_LINK_FRAME_TOO_LARGE',
            `peer takes frames of up to ${h.maxFrame} bytes; this gateway's can be ${LARGEST_FRAME[role]}`,
          );
        peer = { id: h.gatewayId, nonce: h.nonce, maxFrame: h.maxFrame };
        socket.write(encodeFrame({ proof: { mac: proof(me.key, role, nonce, peer.nonce, me.gatewayId) } }));
        return;
      }
      if (!('proof' in f)) throw new LinkProtocolError('ERR_LINK_UNEXPECTED', `${frameKind(f)} before proof`);
      const want = proof(me.key, peerRole, peer.nonce, nonce, peer.id);
      if (f.proof.mac.length !== want.length || !crypto.timingSafeEqual(f.proof.mac, want))
        throw new LinkProtocolError('ERR_LINK_AUTH', 'peer does not hold the cluster key');
      reader.setLimit(me.maxFrame);
      finish(null, new Link(socket, peer.id, peer.maxFrame, reader));
    };
    const onData = (chunk: Buffer): void => {
      reader.push(chunk);
      try {
        for (let f = settled ? null : reader.next(); f !== null; f = settled ? null : reader.next())
          handle(f);
      } catch (err) {
        if (err instanceof LinkProtocolError || err instanceof LinkRefusedError) finish(err);
        else throw err;
      }
    };
    const onClose = (): void => finish(new Error('peer closed the connection during the handshake'));
    const onSocketError = (err: Error): void => finish(err);
    const timer = setTimeout(
      () => finish(new LinkProtocolError('ERR_LINK_TIMEOUT', `no handshake within ${timeoutMs} ms`)),
      timeoutMs,
    );
    socket.on('data', onData);
    socket.on('close', onClose);
    socket.on('error', onSocketError);
    socket.write(
      encodeFrame({
        hello: { version: LINK_VERSION, gatewayId: me.gatewayId, nonce, maxFrame: me.maxFrame },
      }),
    );
  });
}

/** Connects to a peer's replication listener and authenticates. */
export function connectLink(
  host: string,
  port: number,
  me: LinkIdentity,
  timeoutMs = HANDSHAKE_TIMEOUT_MS,
): Promise<Link> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host, port, noDelay: true, lookup: hostLookup });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no connection to ${host}:${port} within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.removeAllListeners('error');
      establish(socket, 'connector', me, timeoutMs).then(resolve, reject);
    });
  });
}
