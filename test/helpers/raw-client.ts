// A minimal NBD client over a raw socket, for tests that must send what real
// clients never would: bad magic, unknown flags, oversized options. Built on
// the protocol codecs; it reads the server's bytes into one growing buffer.

import net from 'node:net';
import { Cmd, ClientFlag, Info, Opt, Size } from '../../protocol/nbd/constants';
import { decodeOptionReplyHeader, encodeInfoRequest, encodeOption } from '../../protocol/nbd/handshake';
import {
  decodeChunkHeader,
  decodeSimpleReply,
  encodeRequest,
  Request,
} from '../../protocol/nbd/transmission';

export class RawClient {
  private buf = Buffer.alloc(0);
  private waiters: Array<() => void> = [];
  closed = false;

  private constructor(readonly socket: net.Socket) {
    socket.on('data', (c: Buffer) => {
      this.buf = Buffer.concat([this.buf, c]);
      this.wake();
    });
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
    socket.on('error', () => undefined);
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  static connect(path: string): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect(path);
      s.once('connect', () => resolve(new RawClient(s)));
      s.once('error', reject);
    });
  }

  send(data: Buffer): void {
    this.socket.write(data);
  }

  /** Reads exactly n bytes; rejects if the server closes first or after timeoutMs. */
  async read(n: number, timeoutMs = 5000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.buf.length < n) {
      if (this.closed) throw new Error(`connection closed with ${this.buf.length}/${n} bytes`);
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${n} bytes`);
      await new Promise<void>((resolve) => {
        this.waiters.push(resolve);
        setTimeout(resolve, 50);
      });
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  /** Resolves true if the server closes the connection within timeoutMs. */
  async closedWithin(timeoutMs = 3000): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.closed && Date.now() < deadline) {
      await new Promise<void>((resolve) => {
        this.waiters.push(resolve);
        setTimeout(resolve, 50);
      });
    }
    return this.closed;
  }

  /** Reads the 18-byte greeting and answers with client flags. */
  async greet(flags: number = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES): Promise<void> {
    await this.read(Size.SERVER_GREETING);
    const f = Buffer.alloc(4);
    f.writeUInt32BE(flags >>> 0);
    this.send(f);
  }

  async optionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = decodeOptionReplyHeader(await this.read(Size.OPTION_REPLY_HEADER), 0);
    return { option: h.option, type: h.type, data: await this.read(h.length) };
  }

  /** Negotiates (optionally structured replies) and GOes to an export; returns its size. */
  async go(exportName: string, structured = false): Promise<number> {
    await this.greet();
    if (structured) {
      this.send(encodeOption(Opt.STRUCTURED_REPLY));
      await this.optionReply();
    }
    this.send(encodeOption(Opt.GO, encodeInfoRequest({ name: exportName, requests: [Info.BLOCK_SIZE] })));
    let size = -1;
    for (;;) {
      const r = await this.optionReply();
      if (r.type === 3 && r.data.readUInt16BE(0) === Info.EXPORT) size = Number(r.data.readBigUInt64BE(2));
      if (r.type === 1) return size;
      if (r.type & 0x80000000) throw new Error(`GO refused: ${r.data.toString()}`);
    }
  }

  request(req: Partial<Request> & { type: number }, payload?: Buffer): void {
    const buf = Buffer.alloc(Size.REQUEST);
    encodeRequest(
      { flags: 0, cookieHi: 0, cookieLo: 1, offset: 0, length: payload?.length ?? 0, ...req },
      buf,
      0,
    );
    this.send(payload ? Buffer.concat([buf, payload]) : buf);
  }

  /** Reads one simple reply; returns its error and cookie. */
  async simpleReply(): Promise<{ error: number; cookieLo: number }> {
    const r = decodeSimpleReply(await this.read(Size.SIMPLE_REPLY), 0);
    return { error: r.error, cookieLo: r.cookieLo };
  }

  /** Reads one structured chunk; returns its header and payload. */
  async chunk(): Promise<{ flags: number; type: number; cookieLo: number; payload: Buffer }> {
    const h = decodeChunkHeader(await this.read(Size.STRUCTURED_REPLY_HEADER), 0);
    return { flags: h.flags, type: h.type, cookieLo: h.cookieLo, payload: await this.read(h.length) };
  }

  disconnect(): void {
    this.request({ type: Cmd.DISC });
    this.socket.end();
  }

  destroy(): void {
    this.socket.destroy();
  }
}
