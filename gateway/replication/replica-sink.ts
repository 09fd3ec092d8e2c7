// The replica's side of a mirror link: the volume's copy here (created
// read-only on the first Mirror frame), and the primary's batches applied one
// at a time in the order they came, each at once (DedupStore.applyMirrored).
// A batch for a volume this link did not open, a block that does not match
// its content id, or a content-id domain other than this store's is refused
// with an Error frame and changes nothing.

import { LinkProtocolError } from '../../protocol/replication/errors';
import type { Extent, Frame, WireBlock } from '../../protocol/replication/frames';
import { native } from '../../native-bindings';
import type { DedupStore, MirroredBlock } from '../store/dedup-store';
import type { Logger } from '../util/log';
import type { Link } from './link';

/** Rounds of Need for one batch (blocks the replica had can be released in between) before giving up. */
const NEED_ROUNDS = 3;

/** What the replica side needs from the volume manager. */
export interface ReplicaVolumes {
  /** Opens (creating it read-only the first time) this gateway's copy; throws a LinkProtocolError if it may not. */
  replicaVolume(
    name: string,
    size: number,
    primary: string,
  ): Promise<{ store: DedupStore; volumeId: number }>;
}

interface Incoming {
  seq: number;
  extents: Extent[];
  durable: boolean;
}

export class ReplicaSink {
  private target: { name: string; store: DedupStore; volumeId: number } | null = null;
  private readonly queue: Incoming[] = [];
  private busy = false;
  /** Resolves the wait of the batch at the head for the blocks it asked for. */
  private awaitingBlocks: { seq: number; resolve: (blocks: WireBlock[]) => void } | null = null;

  constructor(
    private readonly link: Link,
    private readonly volumes: ReplicaVolumes,
    private readonly log: Logger,
  ) {}

  /** Frames of a mirror link; false for those it does not handle. */
  handle(f: Frame): boolean {
    if ('mirror' in f) {
      this.open(f.mirror.volume, f.mirror.size, f.mirror.domain);
      return true;
    }
    if ('batch' in f) {
      if (!this.target) throw new LinkProtocolError('ERR_LINK_UNKNOWN_VOLUME', 'batch before a mirror frame');
      this.queue.push(f.batch);
      this.drain();
      return true;
    }
    if ('blocks' in f) {
      const w = this.awaitingBlocks;
      if (!w || w.seq !== f.blocks.seq)
        throw new LinkProtocolError(
          'ERR_LINK_UNEXPECTED',
          `blocks for batch ${f.blocks.seq}, which asked for none`,
        );
      this.awaitingBlocks = null;
      w.resolve(f.blocks.blocks);
      return true;
    }
    return false;
  }

  private open(name: string, size: number, domain: Buffer): void {
    if (this.target) throw new LinkProtocolError('ERR_LINK_UNEXPECTED', 'second mirror frame on one link');
    this.volumes.replicaVolume(name, size, this.link.peerId).then(
      ({ store, volumeId }) => {
        if (!store.contentDomain().equals(domain)) {
          this.link.fail(
            new LinkProtocolError(
              'ERR_LINK_DOMAIN',
              'content ids of the two stores differ: both data directories must be created with the same --cluster-key',
            ),
          );
          return;
        }
        this.target = { name, store, volumeId };
        this.log.info(`gateway ${this.link.peerId} mirrors ${name} here`);
        this.link.send({ mirrorReady: { volume: name } });
      },
      (err: Error) => {
        this.link.fail(
          err instanceof LinkProtocolError
            ? err
            : new LinkProtocolError('ERR_LINK_UNKNOWN_VOLUME', err.message),
        );
      },
    );
  }

  private drain(): void {
    if (this.busy) return;
    const next = this.queue.shift();
    if (!next) return;
    this.busy = true;
    this.apply(next).then(
      () => {
        this.busy = false;
        this.drain();
      },
      (err: Error) => {
        this.queue.length = 0;
        const e =
          err instanceof LinkProtocolError ? err : new LinkProtocolError('ERR_LINK_BAD_BLOCK', err.message);
        this.log.error(
          `mirror of ${this.target?.name} from gateway ${this.link.peerId}: ${e.code}: ${e.message}`,
        );
        this.link.fail(e);
      },
    );
  }

  private async apply(batch: Incoming): Promise<void> {
    const { store, volumeId } = this.target!;
    const provided = new Map<number, MirroredBlock>();
    let missing = store.missingContent(batch.extents);
    for (let round = 0; ; round++) {
      if (missing.length) {
        if (round >= NEED_ROUNDS)
          throw new LinkProtocolError(
            'ERR_LINK_BAD_BLOCK',
            `batch ${batch.seq} still lacks blocks after ${round} rounds`,
          );
        const blocks = await this.ask(batch.seq, missing);
        for (const b of blocks)
          provided.set(b.ordinal, { block: decodeWireBlock(b), payload: b.payload, lz4: b.lz4 });
      }
      const r = store.applyMirrored(volumeId, batch.extents, provided);
      if ('missing' in r) {
        missing = r.missing;
        continue;
      }
      await r.written;
      break;
    }
    if (batch.durable) await store.flush();
    this.link.send({ ack: { seq: batch.seq } });
  }

  private ask(seq: number, ordinals: number[]): Promise<WireBlock[]> {
    return new Promise((resolve) => {
      this.awaitingBlocks = { seq, resolve };
      this.link.send({ need: { seq, ordinals } });
    });
  }
}

/** A block's 4 KiB from the wire; the content-id check comes after (applyMirrored). */
function decodeWireBlock(b: WireBlock): Buffer {
  if (!b.lz4) {
    if (b.payload.length !== 4096)
      throw new LinkProtocolError(
        'ERR_LINK_BAD_BLOCK',
        `raw block ${b.ordinal} of ${b.payload.length} bytes`,
      );
    return b.payload;
  }
  // The primary stores a block raw where lz4 gains nothing: a longer lz4 payload is not one of ours.
  if (b.payload.length >= 4096)
    throw new LinkProtocolError('ERR_LINK_BAD_BLOCK', `lz4 block ${b.ordinal} of ${b.payload.length} bytes`);
  const out = Buffer.allocUnsafe(4096);
  if (native.lz4Decompress(b.payload, out) !== 4096)
    throw new LinkProtocolError(
      'ERR_LINK_BAD_BLOCK',
      `block ${b.ordinal}: lz4 payload does not decode to 4 KiB`,
    );
  return out;
}
