// The replica's side of a mirror link: the volume's copy here (created
// read-only on the first Mirror frame), and the primary's batches applied one
// at a time in the order they came, each at once (DedupStore.applyMirrored).
// A batch for a volume this link did not open, a block that does not match
// its content id, or a content-id domain other than this store's is refused
// with an Error frame and changes nothing.

import { LinkProtocolError } from '../../protocol/replication/errors';
import { Extent, Frame, KIND_DATA, WireBlock } from '../../protocol/replication/frames';
import type { DedupStore, MirroredBlock } from '../store/dedup-store';
import type { Logger } from '../util/log';
import type { Link } from './link';
import { CHUNK_BLOCKS, FETCH_BLOCKS_MAX, SCRUB_SLICE_BLOCKS } from './mirror';

/** Rounds of Need for one batch (blocks the replica had can be released in between) before giving up. */
const NEED_ROUNDS = 3;

/** What the replica side needs from the volume manager. */
export interface ReplicaVolumes {
  /**
   * Opens (creating it read-only the first time) this gateway's copy at the primary's
   * generation; throws a LinkProtocolError if it may not (SupersededError when the copy
   * here is newer).
   */
  replicaVolume(
    name: string,
    size: number,
    primary: string,
    generation: number,
    /** The seed bundle id the primary believes the copy here was imported from (replica add --seeded). */
    seed?: Buffer,
  ): Promise<{ store: DedupStore; volumeId: number; seeded: boolean }>;
  /**
   * Null while the volume is still a replica that takes this generation's batches; else
   * the refusal (SupersededError once promoted here, another error once deleted).
   */
  mirrorRefusal(name: string, generation: number): LinkProtocolError | null;
  /** The primary took snapshot `snap` at this point of the batch order: the copy here takes it too. */
  replicaSnapshot(name: string, snap: string): Promise<void>;
  /** replica add --cutover: the copy here becomes the primary; resolves with its new generation. */
  cutoverPromote(name: string): Promise<number>;
}

/** The volume here has a newer generation than the mirror's: its sender has been superseded. */
export class SupersededError extends LinkProtocolError {
  constructor(
    readonly volume: string,
    readonly generation: number,
  ) {
    super('ERR_LINK_STALE_GENERATION', `volume ${volume} is at generation ${generation} here`);
  }
}

interface Incoming {
  seq: number;
  extents: Extent[];
  durable: boolean;
  /** The blocks asked for on arrival (none missing: resolved at once). */
  fetched: Promise<WireBlock[]>;
  /** Their content ids (latin1 keys), for `coming`. */
  asked: string[];
  /** Blocks the primary sent with the batch. */
  inline: WireBlock[];
}

export class ReplicaSink {
  private target: {
    name: string;
    store: DedupStore;
    volumeId: number;
    generation: number;
    blocks: number;
  } | null = null;
  private closed = false;
  /** Batches, and the requests between them (verify, snapshot, cutover), in the order they came. */
  private readonly queue: Array<Incoming | (() => Promise<void> | void)> = [];
  private busy = false;
  /** Batches waiting for the blocks they asked for, by sequence number. */
  private readonly awaiting = new Map<number, (blocks: WireBlock[]) => void>();
  /**
   * Content ids asked for by batches not applied yet: a later batch naming one will
   * find it stored by then, so it does not ask for it again.
   */
  private readonly coming = new Map<string, number>();

  constructor(
    private readonly link: Link,
    private readonly volumes: ReplicaVolumes,
    private readonly log: Logger,
    /** The sink applying each volume's batches now, shared by the listener's sinks. */
    private readonly owners: Map<string, ReplicaSink>,
  ) {}

  /** The link is gone (or replaced): nothing queued is applied any more. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.queue.length = 0;
    for (const resolve of this.awaiting.values()) resolve([]);
    this.awaiting.clear();
    if (this.target && this.owners.get(this.target.name) === this) this.owners.delete(this.target.name);
    this.link.socket.destroy();
  }

  /** Frames of a mirror link; false for those it does not handle. */
  handle(f: Frame): boolean {
    if ('mirror' in f) {
      this.open(f.mirror.volume, f.mirror.size, f.mirror.domain, f.mirror.generation, f.mirror.seed);
      return true;
    }
    if ('batch' in f) {
      if (!this.target) throw new LinkProtocolError('ERR_LINK_UNKNOWN_VOLUME', 'batch before a mirror frame');
      const refusal = this.volumes.mirrorRefusal(this.target.name, this.target.generation);
      if (refusal) {
        this.refuse(refusal);
        return true;
      }
      // Asked for at once, applied in order: the round trips of a window of batches overlap.
      const cids = cidsOf(f.batch.extents);
      const inline = f.batch.blocks ?? [];
      const sent = new Set<number>();
      for (const b of inline) {
        if (b.ordinal >= cids.length)
          throw new LinkProtocolError(
            'ERR_LINK_MALFORMED',
            `block ${b.ordinal} sent with a batch of ${cids.length}`,
          );
        sent.add(b.ordinal);
      }
      const asked: string[] = [];
      // What came with the batch is on its way like what this batch asks for.
      for (const o of sent) if (!this.coming.has(cids[o]!)) asked.push(cids[o]!);
      const missing = this.target.store.missingContent(f.batch.extents, this).filter((o) => {
        if (sent.has(o)) return false;
        const hk = cids[o]!;
        if (this.coming.has(hk)) return false;
        asked.push(hk);
        return true;
      });
      for (const hk of asked) this.coming.set(hk, (this.coming.get(hk) ?? 0) + 1);
      const fetched = missing.length ? this.ask(f.batch.seq, missing) : Promise.resolve([]);
      this.queue.push({ ...f.batch, fetched, asked, inline });
      this.drain();
      return true;
    }
    if ('verifyChunks' in f || 'verifyBlocks' in f) {
      const t = this.target;
      if (!t) throw new LinkProtocolError('ERR_LINK_UNKNOWN_VOLUME', 'verify before a mirror frame');
      this.queue.push(() => {
        try {
          this.link.send(this.verify(t.store, t.volumeId, t.blocks, f));
        } catch (err) {
          // A request this copy cannot answer (malformed) says so; anything else is its store's.
          this.refuse(
            err instanceof LinkProtocolError
              ? err
              : new LinkProtocolError('ERR_LINK_BAD_BLOCK', `verify: ${(err as Error).message}`),
          );
        }
      });
      this.drain();
      return true;
    }
    if ('scrubBlocks' in f) {
      const t = this.target;
      if (!t) throw new LinkProtocolError('ERR_LINK_UNKNOWN_VOLUME', 'scrub before a mirror frame');
      const { seq, lba, count } = f.scrubBlocks;
      if (lba + count > t.blocks || count > SCRUB_SLICE_BLOCKS)
        throw new LinkProtocolError(
          'ERR_LINK_MALFORMED',
          `scrub of blocks ${lba}+${count} (at most ${SCRUB_SLICE_BLOCKS}) of a volume of ${t.blocks} blocks`,
        );
      // After the batches before it, as verify's requests: the copy it reads is theirs.
      this.queue.push(async () => {
        try {
          const damaged = await t.store.scrub(t.volumeId, lba, count);
          this.link.send({ scrubBlocksResult: { seq, damaged } });
        } catch (err) {
          this.refuse(new LinkProtocolError('ERR_LINK_BAD_BLOCK', `scrub: ${(err as Error).message}`));
        }
      });
      this.drain();
      return true;
    }
    if ('fetchBlocks' in f) {
      const t = this.target;
      if (!t) throw new LinkProtocolError('ERR_LINK_UNKNOWN_VOLUME', 'fetch before a mirror frame');
      const { seq, lbas } = f.fetchBlocks;
      if (lbas.length > FETCH_BLOCKS_MAX || lbas.some((lba) => lba >= t.blocks))
        throw new LinkProtocolError(
          'ERR_LINK_MALFORMED',
          `fetch of ${lbas.length} blocks (at most ${FETCH_BLOCKS_MAX}) of a volume of ${t.blocks} blocks`,
        );
      this.queue.push(async () => {
        const blocks: WireBlock[] = [];
        for (const [ordinal, lba] of lbas.entries()) {
          const r = t.store.captureRange(t.volumeId, lba, 1);
          const src = r.sources[0];
          if (r.kinds[0] !== KIND_DATA || !src) continue;
          try {
            blocks.push({ ordinal, ...(await t.store.sourcePayload(src)) });
          } catch {
            // Damaged here too, or gone since: the primary gets what there is.
          }
        }
        this.link.send({ blocks: { seq, blocks } });
      });
      this.drain();
      return true;
    }
    if ('snapshot' in f || 'cutover' in f) {
      const t = this.target;
      if (!t)
        throw new LinkProtocolError('ERR_LINK_UNKNOWN_VOLUME', `${Object.keys(f)[0]} before a mirror frame`);
      if ('snapshot' in f) {
        const snap = f.snapshot.name;
        this.queue.push(() =>
          this.volumes.replicaSnapshot(t.name, snap).then(
            () => this.log.info(`volume ${t.name}: snapshot ${snap} taken as on gateway ${this.link.peerId}`),
            (err: Error) =>
              this.log.warn(
                `volume ${t.name}: snapshot ${snap} of the primary not taken here: ${err.message}`,
              ),
          ),
        );
      } else {
        if (f.cutover.volume !== t.name)
          throw new LinkProtocolError(
            'ERR_LINK_UNKNOWN_VOLUME',
            `cutover of ${f.cutover.volume} on the link of ${t.name}`,
          );
        this.queue.push(async () => {
          // Everything before is applied; durable too, before this copy answers for the volume.
          await t.store.flush();
          const generation = await this.volumes.cutoverPromote(t.name);
          this.link.send({ cutoverDone: { generation } });
        });
      }
      this.drain();
      return true;
    }
    if ('blocks' in f) {
      const resolve = this.awaiting.get(f.blocks.seq);
      if (!resolve)
        throw new LinkProtocolError(
          'ERR_LINK_UNEXPECTED',
          `blocks for batch ${f.blocks.seq}, which asked for none`,
        );
      this.awaiting.delete(f.blocks.seq);
      resolve(f.blocks.blocks);
      return true;
    }
    return false;
  }

  /** Tells a superseded primary so (it stops taking writes), then closes the link. */
  private refuse(err: LinkProtocolError): void {
    if (err instanceof SupersededError)
      this.link.send({ superseded: { volume: err.volume, generation: err.generation } });
    this.link.fail(err);
  }

  private open(name: string, size: number, domain: Buffer, generation: number, seed?: Buffer): void {
    if (this.target) throw new LinkProtocolError('ERR_LINK_UNEXPECTED', 'second mirror frame on one link');
    this.volumes
      .replicaVolume(name, size, this.link.peerId, generation, seed?.length ? seed : undefined)
      .then(
        ({ store, volumeId, seeded }) => {
          if (!store.contentDomain().equals(domain)) {
            this.link.fail(
              new LinkProtocolError(
                'ERR_LINK_DOMAIN',
                'content ids of the two stores differ: both data directories must be created with the same --cluster-key',
              ),
            );
            return;
          }
          if (this.closed) return;
          this.target = { name, store, volumeId, generation, blocks: Math.ceil(size / 4096) };
          // One sink per volume: a link the primary gave up on must not apply its queue
          // after the new one has started (older states over newer ones).
          const prev = this.owners.get(name);
          if (prev && prev !== this) prev.close();
          this.owners.set(name, this);
          this.log.info(`gateway ${this.link.peerId} mirrors ${name} here`);
          this.link.send({ mirrorReady: { volume: name, seeded } });
        },
        (err: Error) => {
          this.log.warn(`mirror of ${name} from gateway ${this.link.peerId} refused: ${err.message}`);
          this.refuse(
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
    if (typeof next === 'function') {
      // A request answered at its place in the batch order: every batch before it is applied.
      this.busy = true;
      Promise.resolve()
        .then(next)
        .then(
          () => {
            this.busy = false;
            this.drain();
          },
          (err: Error) => {
            this.queue.length = 0;
            this.refuse(
              err instanceof LinkProtocolError ? err : new LinkProtocolError('ERR_LINK_REFUSED', err.message),
            );
          },
        );
      return;
    }
    this.busy = true;
    this.apply(next).then(
      () => {
        for (const hk of next.asked) {
          const n = this.coming.get(hk)! - 1;
          if (n > 0) this.coming.set(hk, n);
          else this.coming.delete(hk);
        }
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
        this.refuse(e);
      },
    );
  }

  /**
   * Applies a batch (after the ones before it) and acknowledges it: at once when it is
   * not durable (readers see it; a crash before the next durable point loses it, and
   * the primary, which keeps such batches' ranges, sends them again), after a
   * checkpoint when it is.
   */
  private async apply(batch: Incoming): Promise<void> {
    const { store, volumeId } = this.target!;
    const provided = new Map<number, MirroredBlock>();
    let blocks = [...batch.inline, ...(await batch.fetched)];
    for (let round = 0; ; round++) {
      // Decoded and checked by applyMirrored, for the blocks this replica still lacks.
      for (const b of blocks) provided.set(b.ordinal, b);
      // Checked in the tick the batch applies: closed (a newer link took over) or promoted here since.
      if (this.closed) return;
      const refusal = this.volumes.mirrorRefusal(this.target!.name, this.target!.generation);
      if (refusal) throw refusal;
      // This link's own blocks in flight may be linked: if their write fails, the link fails.
      const r = store.applyMirrored(volumeId, batch.extents, provided, this);
      if ('written' in r) {
        if (batch.durable) {
          await r.written;
          await store.flush();
        } else {
          r.written.catch((err: Error) =>
            this.link.fail(
              new LinkProtocolError('ERR_LINK_BAD_BLOCK', `storing batch ${batch.seq}: ${err.message}`),
            ),
          );
        }
        break;
      }
      // Blocks this replica had when the batch came were released since: ask again.
      if (round + 1 >= NEED_ROUNDS)
        throw new LinkProtocolError(
          'ERR_LINK_BAD_BLOCK',
          `batch ${batch.seq} still lacks blocks after ${round + 1} rounds`,
        );
      blocks = await this.ask(batch.seq, r.missing);
    }
    this.link.send({ ack: { seq: batch.seq } });
  }

  /** This copy's side of a verify request, at its place among the batches. */
  private verify(
    store: DedupStore,
    volumeId: number,
    blocks: number,
    f:
      | { verifyChunks: { seq: number; first: number; digests: Buffer } }
      | { verifyBlocks: { seq: number; lba: number; kinds: Buffer; cids: Buffer } },
  ): Frame {
    if ('verifyChunks' in f) {
      const { first, digests: theirs } = f.verifyChunks;
      const chunks = theirs.length / 32;
      const ours = store.chunkDigests(volumeId, blocks, first, chunks);
      if (ours.length !== theirs.length)
        throw new LinkProtocolError(
          'ERR_LINK_MALFORMED',
          `digests of chunks ${first}-${first + chunks - 1} of a volume of ${Math.ceil(blocks / CHUNK_BLOCKS)} chunks`,
        );
      const mismatched: number[] = [];
      for (let c = 0; c < chunks; c++)
        if (ours.compare(theirs, c * 32, c * 32 + 32, c * 32, c * 32 + 32) !== 0) mismatched.push(first + c);
      return { verifyChunksResult: { seq: f.verifyChunks.seq, mismatched } };
    }
    const { seq, lba, kinds, cids } = f.verifyBlocks;
    const mine = store.captureRange(volumeId, lba, kinds.length);
    const mismatched: number[] = [];
    let a = 0;
    let b = 0;
    for (let i = 0; i < kinds.length; i++) {
      const k = kinds[i]!;
      const m = mine.kinds[i]!;
      const same = k === m && (k !== KIND_DATA || cids.compare(mine.cids, b, b + 16, a, a + 16) === 0);
      if (k === KIND_DATA) a += 16;
      if (m === KIND_DATA) b += 16;
      if (!same) mismatched.push(lba + i);
    }
    return { verifyBlocksResult: { seq, mismatched } };
  }

  private ask(seq: number, ordinals: number[]): Promise<WireBlock[]> {
    return new Promise((resolve) => {
      this.awaiting.set(seq, resolve);
      this.link.send({ need: { seq, ordinals } });
    });
  }
}

/** The content id (latin1 key) of each data block of a batch, by ordinal. */
function cidsOf(extents: Extent[]): string[] {
  const out: string[] = [];
  for (const e of extents)
    for (let at = 0; at < e.cids.length; at += 16) out.push(e.cids.toString('latin1', at, at + 16));
  return out;
}
