// The replication listener (`serve --replication-listen`): accepts links from
// peer gateways, authenticates them with the cluster key, and serves what a
// link carries. Every refusal is logged with the peer's address and code.

import net from 'node:net';
import { LinkProtocolError } from '../../protocol/replication/errors';
import { Frame, frameKind } from '../../protocol/replication/frames';
import type { Logger } from '../util/log';
import { establish, Link, LinkIdentity } from './link';
import { ReplicaSink, ReplicaVolumes } from './replica-sink';

export class LinkListener {
  private server: net.Server | null = null;
  private readonly links = new Set<Link>();
  private readonly pending = new Set<net.Socket>();
  private readonly sinks = new WeakMap<Link, ReplicaSink>();
  /** The sink applying each volume's mirror now. */
  private readonly owners = new Map<string, ReplicaSink>();

  constructor(
    private readonly me: LinkIdentity,
    private readonly log: Logger,
    /** Where mirrored volumes land; null: this gateway holds no replicas. */
    private readonly volumes: ReplicaVolumes | null = null,
  ) {}

  /** Resolves with the port actually bound (0 picks one). */
  async listen(host: string, port: number): Promise<number> {
    const server = net.createServer({ noDelay: true }, (socket) => this.accept(socket));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => {
        server.off('error', reject);
        resolve();
      });
    });
    server.on('error', (err) => this.log.error(`replication listener: ${err.message}`));
    this.server = server;
    return (server.address() as net.AddressInfo).port;
  }

  get linkCount(): number {
    return this.links.size;
  }

  private accept(socket: net.Socket): void {
    const remote = `${socket.remoteAddress}:${socket.remotePort}`;
    this.pending.add(socket);
    establish(socket, 'acceptor', this.me).then(
      (link) => {
        this.pending.delete(socket);
        this.links.add(link);
        this.log.info(`link from gateway ${link.peerId} at ${remote} is up`);
        link.onFrame = (f) => {
          try {
            this.serve(link, f);
          } catch (err) {
            if (err instanceof LinkProtocolError) link.fail(err);
            else throw err;
          }
        };
        link.onError = (err) =>
          this.log.warn(
            `link from gateway ${link.peerId} at ${remote}: ${(err as { code?: string }).code ?? ''} ${err.message}`,
          );
        socket.on('close', () => {
          this.links.delete(link);
          this.sinks.get(link)?.close();
          this.log.info(`link from gateway ${link.peerId} at ${remote} closed`);
        });
        link.start();
      },
      (err: Error & { code?: string }) => {
        this.pending.delete(socket);
        this.log.warn(`link from ${remote} refused: ${err.code ?? 'error'}: ${err.message}`);
      },
    );
  }

  private serve(link: Link, f: Frame): void {
    if ('ping' in f) {
      link.send({ pong: { seq: f.ping.seq } });
      return;
    }
    if ('error' in f) {
      this.log.warn(`gateway ${link.peerId} closed its link: ${f.error.code}: ${f.error.message}`);
      link.close();
      return;
    }
    if (this.volumes) {
      let sink = this.sinks.get(link);
      if (!sink) {
        sink = new ReplicaSink(link, this.volumes, this.log, this.owners);
        this.sinks.set(link, sink);
      }
      if (sink.handle(f)) return;
    }
    link.fail(new LinkProtocolError('ERR_LINK_UNEXPECTED', `${frameKind(f)} on an established link`));
  }

  async close(): Promise<void> {
    const server = this.server;
    this.server = null;
    for (const s of this.pending) s.destroy();
    for (const l of this.links) l.socket.destroy();
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}
