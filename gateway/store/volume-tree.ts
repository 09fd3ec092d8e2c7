// Snapshots and clones as links between store volumes, so neither copies a
// metamap. A snapshot is a volume that starts empty and falls through to its
// origin; before the origin's mapping of a block first changes, the newest
// snapshot gets the old mapping as its own entry (copy-on-first-write, as LVM
// snapshots do, but of a metamap entry, never of data). Older snapshots fall
// through to the next newer one, so only the newest is ever written: a
// chain oldest -> ... -> newest -> origin. A clone is a writable volume that
// falls through to a snapshot, which never changes what it reads as.
//
// Every own entry holds one reference to its block, so reference counts stay
// exact without a special case: a snapshot's preserved entry holds the block
// the origin let go of. A linked volume needs one more kind of entry, a hole
// that hides its parent's block (MASK_BLOCK).

import { MASK_BLOCK, ZERO_BLOCK, metaKey } from './layout';

export interface VolumeLink {
  /** The volume reads fall through to where this one has no entry of its own. */
  parent: number;
  kind: 'snapshot' | 'clone';
  /** Reads fall through only below this block: the parent may be larger (it grew, or this one shrank). */
  blocks: number;
}

/** What the store persists: links by volume id, and each origin's newest snapshot. */
export interface TreeState {
  links: Record<string, VolumeLink>;
  newest: Record<string, number>;
}

/** The store's metamap as the tree sees it: own entries only. */
export interface OwnEntries {
  /** A volume's own entry at a key: a block id, ZERO_BLOCK, MASK_BLOCK, or undefined for none. */
  own(key: number): number | undefined;
  /** Sets (or, with undefined, removes) an own entry, moving references with it. */
  setOwn(key: number, value: number | undefined): void;
  /** The blocks a volume has own entries for, ascending. */
  ownBlocks(volume: number): number[];
}

export class TreeError extends Error {
  override name = 'TreeError';
}

export class VolumeTree {
  private readonly links = new Map<number, VolumeLink>();
  private readonly newest = new Map<number, number>();

  constructor(
    state: TreeState | undefined,
    private readonly meta: OwnEntries,
  ) {
    for (const [id, link] of Object.entries(state?.links ?? {})) this.links.set(Number(id), { ...link });
    for (const [id, snap] of Object.entries(state?.newest ?? {})) this.newest.set(Number(id), snap);
  }

  toJSON(): TreeState {
    const links: Record<string, VolumeLink> = {};
    const newest: Record<string, number> = {};
    for (const [id, link] of this.links) links[id] = { ...link };
    for (const [id, snap] of this.newest) newest[id] = snap;
    return { links, newest };
  }

  /** Whether the tree names `volume` at all: linked, a parent, or an origin's newest snapshot. */
  mentions(volume: number): boolean {
    if (this.links.has(volume) || this.newest.has(volume)) return true;
    for (const link of this.links.values()) if (link.parent === volume) return true;
    for (const snap of this.newest.values()) if (snap === volume) return true;
    return false;
  }

  /** True when reads of `volume` may fall through to another volume. */
  linked(volume: number): boolean {
    return this.links.has(volume);
  }

  /** True when changes to `volume` must first be preserved in a snapshot. */
  get anySnapshots(): boolean {
    return this.newest.size > 0;
  }

  link(volume: number): VolumeLink | undefined {
    return this.links.get(volume);
  }

  /** What a block of `volume` reads as: a block id, ZERO_BLOCK, or undefined for a hole. */
  resolve(volume: number, lba: number): number | undefined {
    let v = volume;
    for (;;) {
      const own = this.meta.own(metaKey(v, lba));
      if (own !== undefined) return own === MASK_BLOCK ? undefined : own;
      const link = this.links.get(v);
      if (!link || lba >= link.blocks) return undefined;
      v = link.parent;
    }
  }

  /**
   * Called before `volume`'s own entry for `lba` changes: the newest snapshot of
   * it keeps what the block read as until now, unless it already has its own.
   */
  preserve(volume: number, lba: number): void {
    const snap = this.newest.get(volume);
    if (snap === undefined) return;
    if (lba >= this.links.get(snap)!.blocks) return;
    const key = metaKey(snap, lba);
    if (this.meta.own(key) !== undefined) return;
    this.meta.setOwn(key, this.resolve(volume, lba) ?? MASK_BLOCK);
  }

  /** Registers `snap` (an empty volume) as the newest snapshot of `origin`, which has `blocks` blocks now. */
  snapshot(origin: number, snap: number, blocks: number): void {
    const prev = this.newest.get(origin);
    this.links.set(snap, { parent: origin, kind: 'snapshot', blocks });
    if (prev !== undefined) this.links.get(prev)!.parent = snap;
    this.newest.set(origin, snap);
  }

  /** Registers `clone` (an empty volume) as reading through to snapshot `base` below `blocks`. */
  clone(base: number, clone: number, blocks: number): void {
    const link = this.links.get(base);
    if (link?.kind !== 'snapshot') throw new TreeError(`volume #${base} is not a snapshot`);
    this.links.set(clone, { parent: base, kind: 'clone', blocks });
  }

  /** Volumes reading through `volume` other than its own older snapshot: its clones, or its snapshots. */
  dependents(volume: number): number[] {
    const out: number[] = [];
    for (const [id, link] of this.links) {
      if (link.parent !== volume) continue;
      const olderSnapshot = link.kind === 'snapshot' && this.links.get(volume)?.kind === 'snapshot';
      if (!olderSnapshot) out.push(id);
    }
    return out;
  }

  /** The origin of snapshot `snap`: the first volume up its chain that is not a snapshot. */
  originOf(snap: number): number {
    let v = snap;
    for (let link = this.links.get(v); link?.kind === 'snapshot'; link = this.links.get(v)) v = link.parent;
    return v;
  }

  /** `origin`'s snapshots, oldest first. */
  chain(origin: number): number[] {
    const out: number[] = [];
    for (let s = this.newest.get(origin); s !== undefined; s = this.olderThan(s)) out.unshift(s);
    return out;
  }

  private olderThan(snap: number): number | undefined {
    for (const [id, link] of this.links) if (link.parent === snap && link.kind === 'snapshot') return id;
    return undefined;
  }

  /**
   * Unlinks `volume` before its own entries are released: a snapshot first hands
   * the entries its older neighbour reads through to it down to that neighbour.
   * Costs in proportion to the volume's own entries. Refused while anything but
   * that neighbour reads through it.
   */
  unlink(volume: number): void {
    const deps = this.dependents(volume);
    if (deps.length)
      throw new TreeError(`volume #${volume} has dependents: ${deps.map((d) => `#${d}`).join(', ')}`);
    const link = this.links.get(volume);
    if (!link) return;
    if (link.kind === 'snapshot') {
      const older = this.olderThan(volume);
      if (older !== undefined) {
        const olderLink = this.links.get(older)!;
        for (const lba of this.meta.ownBlocks(volume)) {
          if (lba >= olderLink.blocks) continue;
          const olderKey = metaKey(older, lba);
          if (this.meta.own(olderKey) === undefined)
            this.meta.setOwn(olderKey, this.meta.own(metaKey(volume, lba)));
        }
        olderLink.parent = link.parent;
        olderLink.blocks = Math.min(olderLink.blocks, link.blocks);
      }
      const origin = this.originOf(volume);
      if (this.newest.get(origin) === volume) {
        if (older !== undefined) this.newest.set(origin, older);
        else this.newest.delete(origin);
      }
    }
    this.links.delete(volume);
  }

  /** Reads through `volume`'s parent stop at `blocks` (it shrank): growing it again shows holes there. */
  truncate(volume: number, blocks: number): void {
    const link = this.links.get(volume);
    if (link) link.blocks = Math.min(link.blocks, blocks);
  }

  /**
   * Blocks that may differ between snapshot `older` and `newer` (a later snapshot
   * of the same origin, or the origin itself): every block the origin changed in
   * between was preserved in one of the snapshots from `older` on. Ascending.
   */
  changedSince(older: number, newer: number): number[] {
    const origin = this.originOf(older);
    const chain = this.chain(origin);
    const from = chain.indexOf(older);
    if (from < 0) throw new TreeError(`volume #${older} is not a snapshot`);
    const to = newer === origin ? chain.length : chain.indexOf(newer);
    if (to < from) throw new TreeError(`volume #${newer} is not newer than #${older} in one chain`);
    const blocks = new Set<number>();
    for (let i = from; i < to; i++) for (const lba of this.meta.ownBlocks(chain[i]!)) blocks.add(lba);
    return [...blocks].sort((a, b) => a - b);
  }

  /** True when `a` comes before `b` in the snapshot chain of one origin (b may be the origin). */
  isOlder(a: number, b: number): boolean {
    for (let link = this.links.get(a); link?.kind === 'snapshot'; link = this.links.get(link.parent)) {
      if (link.parent === b) return true;
    }
    return false;
  }

  /** What `volume`'s own entry must be to read as `value` (a hole over a parent must be explicit). */
  entryFor(volume: number, value: number | undefined): number | undefined {
    if (value !== undefined) return value;
    return this.links.has(volume) ? MASK_BLOCK : undefined;
  }
}

/**
 * A block id that reads as data: not a hole (undefined, or the overlay's HOLE, which
 * is negative), a zero block, or a mask. Block ids count up from 1.
 */
export function isData(id: number | undefined): id is number {
  return id !== undefined && id > ZERO_BLOCK && id !== MASK_BLOCK;
}
