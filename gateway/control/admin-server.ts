// The admin socket: a Unix socket only the gateway's own user (or root) may
// use, mode 0600, checked again per connection with SO_PEERCRED.

import fs from 'node:fs';
import net from 'node:net';
import { native } from '../../native-bindings';
import {
  AdminDecodeError,
  AdminResponse,
  decodeRequest,
  encodeMessage,
  LineSplitter,
} from '../../protocol/admin/messages';
import { BlockgateError } from '../errors';
import type { Logger } from '../util/log';
import { runCommand } from './commands';

type Table = Parameters<typeof runCommand>[0];

export class AdminServer {
  private server: net.Server | null = null;

  constructor(
    private readonly path: string,
    private readonly table: Table,
    private readonly log: Logger,
  ) {}

  async listen(): Promise<void> {
    if (fs.existsSync(this.path)) fs.unlinkSync(this.path); // the data-dir lock proves it is stale
    const server = net.createServer((s) => this.accept(s));
    const oldMask = process.umask(0o177);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(this.path, () => {
          server.off('error', reject);
          resolve();
        });
      });
    } finally {
      process.umask(oldMask);
    }
    fs.chmodSync(this.path, 0o600);
    server.on('error', (err) => this.log.error(`admin socket: ${err.message}`));
    this.server = server;
    this.log.info(`admin socket at ${this.path}`);
  }

  private accept(socket: net.Socket): void {
    const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
    let peer = 'unknown peer';
    if (fd !== undefined && fd >= 0) {
      const cred = native.peerCredentials(fd);
      const me = process.getuid?.() ?? 0;
      if (cred.uid !== 0 && cred.uid !== me) {
        this.log.warn(`admin connection from uid ${cred.uid} (pid ${cred.pid}) refused`);
        socket.destroy();
        return;
      }
      peer = `pid ${cred.pid}`;
    }
    const lines = new LineSplitter();
    socket.setEncoding('utf8');
    socket.on('data', (text: string) => {
      let batch: string[];
      try {
        batch = lines.push(text);
      } catch (err) {
        this.reply(socket, {
          id: null,
          ok: false,
          error: { code: 'ERR_BAD_REQUEST', message: (err as Error).message },
        });
        socket.end();
        return;
      }
      for (const line of batch) void this.handle(socket, line, peer);
    });
    socket.on('error', (err) => this.log.debug(`admin client: ${err.message}`));
  }

  private async handle(socket: net.Socket, line: string, peer: string): Promise<void> {
    let id: number | null = null;
    try {
      const req = decodeRequest(line);
      id = req.id;
      this.log.debug(`${peer}: ${req.command}`);
      const result = await runCommand(this.table, req.command, req.args);
      this.reply(socket, { id, ok: true, result: result ?? null });
    } catch (err) {
      const known = err instanceof BlockgateError || err instanceof AdminDecodeError;
      const code = known ? err.code : 'ERR_INTERNAL';
      const message = err instanceof Error ? err.message : String(err);
      if (known) this.log.warn(`admin: ${message}`);
      else this.log.error(`admin: unexpected failure: ${(err as Error)?.stack ?? message}`);
      this.reply(socket, { id, ok: false, error: { code, message } });
    }
  }

  private reply(socket: net.Socket, res: AdminResponse): void {
    if (!socket.destroyed) socket.write(encodeMessage(res));
  }

  async close(): Promise<void> {
    const server = this.server;
    if (!server) return;
    this.server = null;
    await new Promise<void>((resolve) => server.close(() => resolve()));
    fs.rmSync(this.path, { force: true });
  }
}
