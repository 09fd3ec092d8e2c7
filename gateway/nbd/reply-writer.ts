// Writes replies for one connection. Replies completed in the same tick are
// corked into one writev; READ data is read straight into the buffer that
// already holds its reply header, so a read reply is a single write.

import type { Socket } from 'node:net';
import { ChunkType, ReplyFlag, Size } from '../../protocol/nbd/constants';
import {
  encodeChunk,
  encodeOffsetDataPrefix,
  encodeSimpleReply,
  Extent,
  OFFSET_DATA_PREFIX,
} from '../../protocol/nbd/transmission';
import { sharedBufferPool } from '../util/buffer-pool';
import { SlabAllocator } from '../util/slab';

export class ReplyWriter {
  private corked = false;
  private readonly slab = new SlabAllocator();
  private readonly uncork = (): void => {
    this.corked = false;
    this.socket.uncork();
  };

  constructor(
    private readonly socket: Socket,
    private readonly structured: boolean,
  ) {}

  /** Bytes in front of READ data in its reply. */
  get readPrefix(): number {
    return this.structured ? OFFSET_DATA_PREFIX : Size.SIMPLE_REPLY;
  }

  /** A buffer for a READ reply; the data goes at `readPrefix`. */
  allocRead(length: number): Buffer {
    const n = this.readPrefix + length;
    return n < sharedBufferPool.minSize ? this.slab.alloc(n) : sharedBufferPool.acquire(n);
  }

  /** Sends a READ reply whose data was read into `buf` at `readPrefix`. */
  sendRead(buf: Buffer, cookieHi: number, cookieLo: number, offset: number): void {
    if (this.structured) {
      encodeOffsetDataPrefix(
        buf,
        0,
        ReplyFlag.DONE,
        cookieHi,
        cookieLo,
        offset,
        buf.length - OFFSET_DATA_PREFIX,
      );
    } else {
      encodeSimpleReply(buf, 0, 0, cookieHi, cookieLo);
    }
    // Recycled once the socket is done with it (written, or the connection gone).
    if (buf.length < sharedBufferPool.minSize) return this.send(buf, () => this.slab.free(buf));
    this.send(buf, () => sharedBufferPool.release(buf));
  }

  sendOk(cookieHi: number, cookieLo: number): void {
    const buf = this.slab.alloc(Size.SIMPLE_REPLY);
    encodeSimpleReply(buf, 0, 0, cookieHi, cookieLo);
    this.send(buf, () => this.slab.free(buf));
  }

  /** An error reply: a structured ERROR chunk with its message when negotiated, else a simple reply. */
  sendError(cookieHi: number, cookieLo: number, error: number, message: string): void {
    if (this.structured) {
      const msg = message.length > 1024 ? message.slice(0, 1024) : message;
      this.send(
        encodeChunk(ReplyFlag.DONE, cookieHi, cookieLo, { type: ChunkType.ERROR, error, message: msg }),
      );
    } else {
      const buf = this.slab.alloc(Size.SIMPLE_REPLY);
      encodeSimpleReply(buf, 0, error, cookieHi, cookieLo);
      this.send(buf, () => this.slab.free(buf));
    }
  }

  sendBlockStatus(cookieHi: number, cookieLo: number, contextId: number, extents: Extent[]): void {
    this.send(
      encodeChunk(ReplyFlag.DONE, cookieHi, cookieLo, { type: ChunkType.BLOCK_STATUS, contextId, extents }),
    );
  }

  private send(buf: Buffer, done?: () => void): void {
    if (this.socket.destroyed) return;
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(this.uncork);
    }
    this.socket.write(buf, done);
  }
}
