// NBD listeners and the life of each connection: negotiation, then the
// request loop, then release of the export.

import fs from 'node:fs';
import net from 'node:net';
import { adoptSocket } from './direct-socket';
import type { Logger } from '../util/log';
import { formatListenAddress, ListenAddress } from './listen-address';
import { Negotiated, Negotiation } from './negotiation';
import type { ExportRegistry } from './registry';
import { RequestLoop } from './request-loop';

/** A client that never finishes negotiating is dropped after this long. */
const NEGOTIATION_TIMEOUT_MS = 30_000;

interface Connection {
  socket: net.Socket;
  loop: RequestLoop | null;
}

export class NbdServer {
  private readonly servers: net.Server[] = [];
  private readonly connections = new Set<Connection>();
  private nextId = 1;

  constructor(
    private readonly registry: ExportRegistry,
    private readonly log: Logger,
  ) {}

  /** Starts listening; resolves with the address actually bound (port 0 picks one). */
  async listen(addr: ListenAddress): Promise<ListenAddress> {
    // Paused: adoptSocket takes the handle over before anything is read.
    const server = net.createServer({ noDelay: true, pauseOnConnect: true }, (socket) => this.accept(socket));
    if (addr.kind === 'unix') await removeStaleSocket(addr.path);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      const done = (): void => {
        server.off('error', reject);
        resolve();
      };
      if (addr.kind === 'unix') server.listen(addr.path, done);
      else server.listen(addr.port, addr.host, done);
    });
    server.on('error', (err) => this.log.error(`listener ${formatListenAddress(addr)}: ${err.message}`));
    this.servers.push(server);
    const bound = server.address();
    const actual: ListenAddress =
      addr.kind === 'unix' || bound === null || typeof bound === 'string'
        ? addr
        : { kind: 'tcp', host: bound.address, port: bound.port };
    this.log.info(`listening on ${formatListenAddress(actual)}`);
    return actual;
  }

  private accept(accepted: net.Socket): void {
    const id = this.nextId++;
    const log = this.log.child(`conn${id}`);
    let negotiation: Negotiation | null = null;
    const conn: Connection = { socket: accepted, loop: null };
    const socket = adoptSocket(accepted, {
      target: () => conn.loop?.readTarget() ?? null,
      received: (chunk, inPlace) => {
        try {
          if (conn.loop) conn.loop.onData(chunk, inPlace);
          else negotiation?.onData(chunk);
        } catch (err) {
          // A bug met by one client costs that client its connection, never the gateway.
          log.error(`internal error, dropping connection: ${(err as Error)?.stack ?? String(err)}`);
          conn.socket.destroy();
        }
      },
    });
    conn.socket = socket;
    const remote = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix';
    this.connections.add(conn);
    log.debug(`connected from ${remote}`);

    let release: (() => void) | null = null;
    const timer = setTimeout(() => {
      log.warn('negotiation timed out');
      socket.destroy();
    }, NEGOTIATION_TIMEOUT_MS);

    const enter = (result: Negotiated | null): void => {
      clearTimeout(timer);
      if (result === null) return;
      try {
        release = this.registry.attach(result.export.name, { id, remote });
      } catch (err) {
        log.warn(`export ${result.export.name} went away: ${(err as Error).message}`);
        socket.destroy();
        return;
      }
      log.debug(`serving export ${result.export.name}`);
      conn.loop = new RequestLoop(socket, result, log);
      conn.loop.start();
    };
    negotiation = new Negotiation(socket, this.registry, log, enter);

    socket.on('error', (err) => log.debug(`socket error: ${err.message}`));
    socket.on('close', () => {
      clearTimeout(timer);
      this.connections.delete(conn);
      if (release) release();
      log.debug('closed');
    });
    negotiation.start();
  }

  /** Stops listening, lets every connection finish what is in flight, then closes them. */
  async close(): Promise<void> {
    // close() stops accepting at once, but its callback waits for every connection to end:
    // start it, drain the connections, then wait for it.
    const listenersClosed = this.servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve())));
    this.servers.length = 0;
    await Promise.all(
      [...this.connections].map(async ({ socket, loop }) => {
        if (loop) await loop.drain();
        await new Promise<void>((resolve) => {
          if (socket.destroyed) return resolve();
          // Bounded wait for the client to close its side. The timer stays referenced and the
          // socket reading (its data is ignored once draining): a paused socket keeps no libuv
          // handle active, and the process would otherwise fall out of its event loop here.
          const timer = setTimeout(() => socket.destroy(), 2000);
          socket.once('close', () => {
            clearTimeout(timer);
            resolve();
          });
          socket.end();
          socket.resume();
        });
      }),
    );
    await Promise.all(listenersClosed);
  }
}

/** A socket file left by a gateway that died is removed; one that still answers is left alone. */
async function removeStaleSocket(path: string): Promise<void> {
  if (!fs.existsSync(path)) return;
  const alive = await new Promise<boolean>((resolve) => {
    const probe = net.connect(path);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (alive) throw new Error(`${path} is in use by another server`);
  fs.unlinkSync(path);
}
