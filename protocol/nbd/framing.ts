// Pull parsers that cut a byte stream into handshake and transmission
// messages. Pure: bytes go in with push(), messages come out of next(), and
// how the stream was split into chunks never changes what comes out.

import { Cmd, Size } from './constants';
import { ByteQueue } from './byte-queue';
import { NbdProtocolError } from './errors';
import { decodeOptionHeader } from './handshake';
import { decodeRequest, Request } from './transmission';

export type HandshakeMessage =
  | { kind: 'client-flags'; flags: number }
  | { kind: 'option'; option: number; data: Buffer }
  /** An option longer than the server accepts; its data was read and dropped. */
  | { kind: 'oversized-option'; option: number; length: number };

export interface HandshakeLimits {
  /** Longest option data kept and parsed. */
  maxOptionData: number;
  /** Longest option data read and dropped; anything longer is a denial of service. */
  maxOptionDiscard: number;
}

export class HandshakeReader {
  private readonly queue = new ByteQueue();
  private state: 'flags' | 'header' | 'data' | 'discard' = 'flags';
  private option = 0;
  private optionLength = 0;
  private discardLeft = 0;

  constructor(private readonly limits: HandshakeLimits) {}

  push(chunk: Buffer): void {
    this.queue.push(chunk);
  }

  /** The next whole message, or null until more bytes arrive. Throws NbdProtocolError on garbage. */
  next(): HandshakeMessage | null {
    for (;;) {
      switch (this.state) {
        case 'flags': {
          if (this.queue.length < 4) return null;
          const flags = this.queue.take(4).readUInt32BE(0);
          this.state = 'header';
          return { kind: 'client-flags', flags };
        }
        case 'header': {
          if (this.queue.length < Size.OPTION_HEADER) return null;
          const h = decodeOptionHeader(this.queue.take(Size.OPTION_HEADER), 0);
          this.option = h.option;
          this.optionLength = h.length;
          if (h.length <= this.limits.maxOptionData) {
            this.state = 'data';
          } else if (h.length <= this.limits.maxOptionDiscard) {
            this.state = 'discard';
            this.discardLeft = h.length;
          } else {
            throw new NbdProtocolError(
              'ERR_NBD_TOO_BIG',
              `option ${h.option} claims ${h.length} bytes of data; refusing to read that much`,
            );
          }
          continue;
        }
        case 'data': {
          if (this.queue.length < this.optionLength) return null;
          this.state = 'header';
          return { kind: 'option', option: this.option, data: this.queue.take(this.optionLength) };
        }
        case 'discard': {
          this.discardLeft -= this.queue.skip(this.discardLeft);
          if (this.discardLeft > 0) return null;
          this.state = 'header';
          return { kind: 'oversized-option', option: this.option, length: this.optionLength };
        }
      }
    }
  }

  /** Bytes received past the last message: the start of the transmission phase. */
  remainder(): Buffer[] {
    return this.queue.drain();
  }
}

export interface IncomingRequest extends Request {
  /** WRITE data; null for other commands and for a WRITE whose payload was dropped. */
  payload: Buffer | null;
  /** A WRITE longer than the maximum payload: its data was read and dropped. */
  oversized: boolean;
  /** The payload was assembled in a buffer from the reader's allocator (the caller may recycle it). */
  assembled: boolean;
}

export class RequestReader {
  private readonly queue = new ByteQueue();
  private pending: IncomingRequest | null = null;
  private discardLeft = 0;
  /** The buffer a WRITE payload that did not arrive whole is assembled in, and how much of it is filled. */
  private assembly: Buffer | null = null;
  private filled = 0;

  /**
   * @param alloc where payloads that straddle received chunks are assembled; payloads
   *   inside one chunk are zero-copy views of it.
   */
  constructor(
    private readonly maxPayload: number,
    private readonly alloc: (n: number) => Buffer = Buffer.allocUnsafe,
  ) {}

  push(chunk: Buffer): void {
    this.queue.push(chunk);
  }

  get buffered(): number {
    return this.queue.length;
  }

  /**
   * Where the next bytes of the stream belong, if the caller can read them there
   * directly: the unfilled rest of a WRITE payload being assembled (then report
   * them with receivedInPlace). Null when they may be pushed from anywhere.
   */
  inPlaceTarget(): Buffer | null {
    if (this.assembly === null || this.queue.length > 0) return null;
    return this.assembly.subarray(this.filled);
  }

  /** `n` bytes were read straight into inPlaceTarget(). */
  receivedInPlace(n: number): void {
    if (this.assembly === null || this.queue.length > 0 || this.filled + n > this.assembly.length)
      throw new RangeError('bytes received in place with no payload waiting for them');
    this.filled += n;
  }

  /** The next whole request, or null until more bytes arrive. Throws NbdProtocolError on a bad magic. */
  next(): IncomingRequest | null {
    let req = this.pending;
    if (req === null) {
      if (this.queue.length < Size.REQUEST) return null;
      const header = decodeRequest(this.queue.peek(Size.REQUEST), 0);
      this.queue.skip(Size.REQUEST);
      req = header as IncomingRequest;
      req.payload = null;
      req.oversized = false;
      req.assembled = false;
      if (req.type !== Cmd.WRITE || req.length === 0) return req;
      this.pending = req;
      if (req.length > this.maxPayload) {
        req.oversized = true;
        this.discardLeft = req.length;
      }
    }
    if (req.oversized) {
      this.discardLeft -= this.queue.skip(this.discardLeft);
      if (this.discardLeft > 0) return null;
    } else if (this.assembly === null && this.queue.length >= req.length) {
      req.assembled = !this.queue.contiguous(req.length);
      req.payload = this.queue.take(req.length, this.alloc);
    } else {
      // Assembled piece by piece as it arrives, so that the rest can be read in place.
      if (this.assembly === null) {
        this.assembly = this.alloc(req.length);
        this.filled = 0;
      }
      const n = Math.min(this.queue.length, req.length - this.filled);
      this.filled += this.queue.copyTo(this.assembly, this.filled, n);
      if (this.filled < req.length) return null;
      req.assembled = true;
      req.payload = this.assembly;
      this.assembly = null;
    }
    this.pending = null;
    return req;
  }
}
