// Accepted sockets whose reads land where the connection wants them.
//
// With 'data' events Node reads into a fresh 64 KiB buffer every time, and a
// 1 MiB WRITE payload costs sixteen allocations and a copy to assemble. With
// `onread` and a buffer function the connection names the buffer of each
// read: the unfilled tail of the payload being assembled, so the kernel copies
// the bytes straight into place, or else the free part of a 64 KiB arena
// shared by consecutive small reads.
//
// net.Server offers no `onread` for the sockets it accepts, so the accepted
// socket's handle moves to a new net.Socket that has one (Node's own accept
// path builds its sockets the same way). The husk left behind is destroyed
// when the new socket closes, which keeps the server's connection count, and
// so server.close(), right. Where the handle cannot be taken (another Node),
// the accepted socket is used with 'data' events as before.

import net from 'node:net';
import { native } from '../../native-bindings';

export interface ReadSink {
  /** Where the next read should land, or null for anywhere. */
  target(): Buffer | null;
  /** Bytes arrived: in the buffer target() named (inPlace), or in a general one. */
  received(chunk: Buffer, inPlace: boolean): void;
}

const ARENA = 64 * 1024;
/** A read is offered at least this much room; an arena with less left is retired. */
const MIN_ROOM = 16 * 1024;

/**
 * Send buffer asked for on Unix-socket connections. Linux gives them net.core.wmem_default
 * (208 KiB) whatever the traffic, so a 1 MiB READ reply went out in pieces, each after a
 * wait for writability: with 4 MiB (the kernel keeps twice that, room for the replies of a
 * QD8 1 MiB reader) blockgate-memory's 1M reads went 2214 / 2323 -> 4268 / 4112 MB/s and
 * dedup's 1643 -> 2167 in alternating runs. The kernel caps it at net.core.wmem_max (4 MiB on
 * the project's VM, 208 KiB on a stock Debian). TCP is left to the kernel's autotuning,
 * which setting SO_SNDBUF would switch off.
 */
export const UNIX_SEND_BUFFER = 4 * 1024 * 1024;

/** Asks for UNIX_SEND_BUFFER on an accepted Unix socket's handle; a failure changes nothing. */
function raiseSendBuffer(handle: object): void {
  const fd = (handle as { fd?: number }).fd;
  if (fd === undefined || fd < 0) return;
  try {
    native.sendBuffer(fd, UNIX_SEND_BUFFER);
  } catch {
    // Only ever a speed-up.
  }
}

interface WithHandle {
  _handle?: object | null;
}

/** The socket to use for an accepted connection whose reads go to `sink`. */
export function adoptSocket(accepted: net.Socket, sink: ReadSink): net.Socket {
  const husk = accepted as unknown as WithHandle;
  const handle = husk._handle;
  if (!handle) {
    accepted.on('data', (chunk: Buffer) => sink.received(chunk, false));
    accepted.resume();
    return accepted;
  }
  let arena = Buffer.allocUnsafe(ARENA);
  let used = 0;
  // Whether the buffer handed out last (the one the next callback reports on) was the arena.
  let fromArena = true;
  const nextBuffer = (): Buffer => {
    const t = sink.target();
    if (t !== null && t.length > 0) {
      fromArena = false;
      return t;
    }
    fromArena = true;
    if (ARENA - used < MIN_ROOM) {
      arena = Buffer.allocUnsafe(ARENA);
      used = 0;
    }
    return arena.subarray(used);
  };
  if (accepted.remoteFamily === undefined) raiseSendBuffer(handle);
  husk._handle = null;
  const socket = new net.Socket({
    handle,
    readable: true,
    writable: true,
    onread: {
      buffer: nextBuffer,
      callback: (n: number, buf: Uint8Array): boolean => {
        const chunk = (buf as Buffer).subarray(0, n);
        if (fromArena) used += n;
        sink.received(chunk, !fromArena);
        return true;
      },
    },
  } as net.SocketConstructorOpts);
  socket.once('close', () => accepted.destroy());
  return socket;
}
