// The transmission phase of one connection: parse requests, check them
// against the export, run them on the device concurrently, reply in
// completion order, and hold back reading when too much is in flight or the
// client stops reading its replies.

import type { Socket } from 'node:net';
import { Cmd, CmdFlag, NbdErr } from '../../protocol/nbd/constants';
import { NbdProtocolError } from '../../protocol/nbd/errors';
import { IncomingRequest, RequestReader } from '../../protocol/nbd/framing';
import type { Extent } from '../device/block-device';
import { BlockError } from '../device/errors';
import { sharedBufferPool } from '../util/buffer-pool';
import type { Logger } from '../util/log';
import { BLOCK_SIZE } from './export-flags';
import { BASE_ALLOCATION_ID, Negotiated } from './negotiation';
import { ReplyWriter } from './reply-writer';

/** In-flight payload bytes per connection above which reading pauses. */
const MAX_INFLIGHT_BYTES = 64 * 1024 * 1024;
const MAX_PAYLOAD = BLOCK_SIZE.maximum;

const CMD_NAMES = ['READ', 'WRITE', 'DISC', 'FLUSH', 'TRIM', 'CACHE', 'WRITE_ZEROES', 'BLOCK_STATUS'];

/** Flags each command accepts. FUA is accepted everywhere, as the spec requires once advertised. */
const ALLOWED_FLAGS: number[] = [
  CmdFlag.FUA | CmdFlag.DF, // READ (DF only with structured replies; checked below)
  CmdFlag.FUA, // WRITE
  0, // DISC
  CmdFlag.FUA, // FLUSH
  CmdFlag.FUA, // TRIM
  CmdFlag.FUA, // CACHE
  CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO, // WRITE_ZEROES
  CmdFlag.FUA | CmdFlag.REQ_ONE, // BLOCK_STATUS
];

const ERRNO: Record<BlockError['code'], number> = NbdErr;

class RequestError extends Error {
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
  }
}

export class RequestLoop {
  private readonly reader = new RequestReader(MAX_PAYLOAD, (n) => sharedBufferPool.acquire(n));
  private readonly replies: ReplyWriter;
  private readonly readOnly: boolean;
  private readonly fastZero: boolean;
  private inflight = 0;
  private inflightBytes = 0;
  private paused = false;
  /** DISC received or the gateway is shutting down: read no further requests. */
  private closing = false;
  private idle: (() => void) | null = null;

  constructor(
    private readonly socket: Socket,
    private readonly session: Negotiated,
    private readonly log: Logger,
  ) {
    this.replies = new ReplyWriter(socket, session.structuredReplies);
    const caps = session.export.device.capabilities();
    this.readOnly = caps.readOnly;
    this.fastZero = caps.fastZero;
    socket.on('drain', () => this.maybeResume());
  }

  start(): void {
    for (const chunk of this.session.remainder) this.reader.push(chunk);
    this.pump();
  }

  /** Bytes from the socket: pushed, or already in place where readTarget() said. */
  onData(chunk: Buffer, inPlace = false): void {
    if (this.closing) return;
    if (inPlace) this.reader.receivedInPlace(chunk.length);
    else this.reader.push(chunk);
    this.pump();
  }

  /** Where the socket's next read should land: the rest of a WRITE payload being assembled. */
  readTarget(): Buffer | null {
    return this.closing ? null : this.reader.inPlaceTarget();
  }

  /** Stops taking requests; resolves when every one in flight has been answered. */
  drain(): Promise<void> {
    this.closing = true;
    this.socket.pause();
    if (this.inflight === 0) return Promise.resolve();
    return new Promise((resolve) => (this.idle = resolve));
  }

  private pump(): void {
    try {
      while (!this.closing && !this.paused) {
        const req = this.reader.next();
        if (req === null) return;
        this.dispatch(req);
        if (this.inflightBytes >= MAX_INFLIGHT_BYTES || this.socket.writableNeedDrain) {
          this.paused = true;
          this.socket.pause();
        }
      }
    } catch (err) {
      if (!(err instanceof NbdProtocolError)) throw err;
      this.log.warn(`dropping connection: ${err.message}`);
      this.closing = true;
      this.socket.destroy();
    }
  }

  private maybeResume(): void {
    if (!this.paused || this.closing) return;
    if (this.inflightBytes >= MAX_INFLIGHT_BYTES / 2 || this.socket.writableNeedDrain) return;
    this.paused = false;
    this.socket.resume();
    this.pump();
  }

  private dispatch(req: IncomingRequest): void {
    if (req.type === Cmd.DISC) {
      this.log.debug('client disconnecting');
      // Reading goes on (anything more is ignored): a paused socket would never see the
      // client's close after ours, and the connection would stay open.
      this.closing = true;
      if (this.inflight === 0) this.socket.end();
      return;
    }
    let op: Promise<unknown>;
    try {
      op = this.begin(req);
    } catch (err) {
      // A device that threw instead of rejecting is answered as a rejection would be (EIO
      // unless it is a BlockError): only a validation failure carries an NBD errno.
      if (!(err instanceof RequestError)) op = Promise.reject(err);
      else {
        // Validation failures: answered at once, the connection lives on.
        this.log.warn(`${CMD_NAMES[req.type] ?? `command ${req.type}`} refused: ${err.message}`);
        this.replies.sendError(req.cookieHi, req.cookieLo, err.errno, err.message);
        return;
      }
    }
    const cost = req.type === Cmd.READ || req.type === Cmd.WRITE ? req.length : 0;
    this.inflight++;
    this.inflightBytes += cost;
    op.then(
      (result) => this.complete(req, cost, result, null),
      (err: unknown) => this.complete(req, cost, undefined, err),
    );
  }

  /** Checks a request against the protocol and the export, then starts it on the device. */
  private begin(req: IncomingRequest): Promise<unknown> {
    const { type, flags, offset, length } = req;
    const device = this.session.export.device;
    const size = device.size;
    if (type >= ALLOWED_FLAGS.length) throw new RequestError(NbdErr.EINVAL, `unknown command ${type}`);
    let allowed = ALLOWED_FLAGS[type]!;
    if (type === Cmd.READ && !this.session.structuredReplies) allowed &= ~CmdFlag.DF;
    if (type === Cmd.WRITE_ZEROES && !this.fastZero) allowed &= ~CmdFlag.FAST_ZERO;
    if (flags & ~allowed)
      throw new RequestError(NbdErr.EINVAL, `flags 0x${flags.toString(16)} not valid here`);
    const fua = (flags & CmdFlag.FUA) !== 0;

    if (type === Cmd.FLUSH) {
      if (offset !== 0 || length !== 0) throw new RequestError(NbdErr.EINVAL, 'FLUSH with offset or length');
      return device.flush();
    }
    const writes = type === Cmd.WRITE || type === Cmd.TRIM || type === Cmd.WRITE_ZEROES;
    if (writes && this.readOnly) throw new RequestError(NbdErr.EPERM, 'export is read-only');
    if (req.oversized) {
      throw new RequestError(NbdErr.EINVAL, `payload of ${length} bytes exceeds ${MAX_PAYLOAD}`);
    }
    if (length === 0) throw new RequestError(NbdErr.EINVAL, 'zero-length request');
    if (offset + length > size) {
      const past = type === Cmd.WRITE || type === Cmd.WRITE_ZEROES ? NbdErr.ENOSPC : NbdErr.EINVAL;
      throw new RequestError(past, `${offset}+${length} is past the end (${size})`);
    }
    switch (type) {
      case Cmd.READ: {
        if (length > MAX_PAYLOAD) throw new RequestError(NbdErr.EINVAL, `read of ${length} bytes`);
        const buf = this.replies.allocRead(length);
        return device.read(offset, buf.subarray(this.replies.readPrefix)).then(() => buf);
      }
      case Cmd.WRITE:
        return device.write(offset, req.payload!, { fua });
      case Cmd.TRIM:
        return device.trim(offset, length, { fua });
      case Cmd.WRITE_ZEROES:
        return device.writeZeroes(offset, length, {
          fua,
          noHole: (flags & CmdFlag.NO_HOLE) !== 0,
          fastZero: (flags & CmdFlag.FAST_ZERO) !== 0,
        });
      case Cmd.CACHE:
        return device.cache(offset, length);
      case Cmd.BLOCK_STATUS:
        if (!this.session.baseAllocation) {
          throw new RequestError(NbdErr.EINVAL, 'BLOCK_STATUS without a negotiated meta context');
        }
        return device.blockStatus(offset, length);
      default:
        throw new RequestError(NbdErr.EINVAL, `unknown command ${type}`);
    }
  }

  private complete(req: IncomingRequest, cost: number, result: unknown, err: unknown): void {
    this.inflight--;
    this.inflightBytes -= cost;
    if (req.assembled) sharedBufferPool.release(req.payload!);
    if (err !== null) {
      const known = err instanceof BlockError;
      const errno = known ? ERRNO[err.code] : NbdErr.EIO;
      const message = err instanceof Error ? err.message : String(err);
      const what = `${CMD_NAMES[req.type]} ${req.offset}+${req.length}`;
      if (known && err.code !== 'EIO') this.log.warn(`${what}: ${err.code} ${message}`);
      else this.log.error(`${what}: ${known ? '' : 'unexpected '}${message}`);
      this.replies.sendError(req.cookieHi, req.cookieLo, errno, message);
    } else if (req.type === Cmd.READ) {
      this.replies.sendRead(result as Buffer, req.cookieHi, req.cookieLo, req.offset);
    } else if (req.type === Cmd.BLOCK_STATUS) {
      this.replies.sendBlockStatus(
        req.cookieHi,
        req.cookieLo,
        BASE_ALLOCATION_ID,
        this.clip(req, result as Extent[]),
      );
    } else {
      this.replies.sendOk(req.cookieHi, req.cookieLo);
    }
    if (this.inflight === 0 && this.closing) {
      if (this.idle) this.idle();
      else this.socket.end();
    }
    this.maybeResume();
  }

  /** Extents within the request (older clients drop the connection otherwise); exactly one for REQ_ONE. */
  private clip(req: IncomingRequest, extents: Extent[]): Extent[] {
    const out: Extent[] = [];
    let left = req.length;
    for (const e of extents) {
      if (left === 0 || e.length === 0) continue;
      const length = Math.min(e.length, left);
      out.push({ length, flags: e.flags });
      left -= length;
      if (req.flags & CmdFlag.REQ_ONE) break;
    }
    if (out.length === 0) out.push({ length: req.length, flags: 0 });
    return out;
  }
}
