// The write splitter: a layer over a dedup volume that, once a change is
// applied locally, hands the state of the blocks it touched (captured in that
// tick) to each of the volume's mirrors, and answers the client when the
// mirrors allow (at once for async replicas; at the acknowledgement for sync
// ones) and the local write is done. A write is captured as soon as reads see
// it (WriteFlags.applied), so the replica's round trip runs while the local
// segment write does, as DRBD submits the local and the remote write at once.
// FLUSH waits for every sync replica to be durable too. A volume in split brain
// (a newer generation of it exists elsewhere) refuses writes: EPERM.

import type { BlockDevice, WriteFlags, ZeroFlags } from '../device/block-device';
import { BlockError } from '../device/errors';
import { Layer } from '../device/layer';
import type { DedupStore } from '../store/dedup-store';
import type { Mirror } from './mirror';

const BLOCK = 4096;

export class MirrorLayer extends Layer {
  constructor(
    next: BlockDevice,
    private readonly store: DedupStore,
    private readonly volumeId: number,
    private readonly mirrors: () => readonly Mirror[],
    /** Why writes are refused now (split brain), or null. */
    private readonly refusal: () => string | null,
  ) {
    super(next);
  }

  private check(): void {
    const why = this.refusal();
    if (why) throw new BlockError('EPERM', why);
  }

  override write(offset: number, data: Buffer, flags?: WriteFlags): Promise<void> {
    // A volume without mirrors passes its flags on as they came: no object per write.
    return this.change(offset, data.length, flags?.fua === true, (applied) =>
      this.next.write(offset, data, applied ? { ...flags, applied } : flags),
    );
  }

  /**
   * One change: refused in split brain; its chunks marked in each mirror's activity log
   * first (durably, before anything is applied: a crash then resends them); applied
   * locally; then its resulting state handed to the mirrors.
   */
  private async change(
    offset: number,
    length: number,
    durable: boolean,
    apply: (applied?: () => void) => Promise<void>,
  ): Promise<void> {
    this.check();
    let ms = this.mirrors();
    if (ms.length === 0) return apply();
    if (ms.some((m) => m.answer !== null)) {
      // A restarted primary: its replicas may hold a newer generation (mirror.ts, answer).
      await Promise.all(ms.map((m) => m.answer));
      this.check();
      ms = this.mirrors();
      if (ms.length === 0) return apply();
    }
    const first = Math.floor(offset / BLOCK);
    const count = Math.ceil((offset + length) / BLOCK) - first;
    const holds = ms.map((m) => m.activate(first, count));
    try {
      const ready = holds.map((h) => h.ready).filter((p): p is Promise<void> => p !== null);
      if (ready.length) await Promise.all(ready);
      let captured = false;
      let mirrored: Promise<void> | undefined;
      const applied = (): void => {
        if (captured) return;
        captured = true;
        // Called inside the store's write, which a throw would undo: any failure here
        // leaves the range to a resync instead.
        try {
          mirrored = this.split(offset, length, durable);
        } catch {
          this.dirty(offset, length);
          return;
        }
        // Observed here: a local failure below leaves it unawaited (the range goes dirty,
        // and a resync sends the replica whatever this copy then holds).
        mirrored?.catch(() => undefined);
      };
      await this.guard(apply(applied), offset, length);
      if (!captured) return this.split(offset, length, durable);
      return mirrored;
    } finally {
      for (const h of holds) h.release();
    }
  }

  /**
   * A change that fails may have applied in part (some blocks stored, an edge not): the
   * replicas are told the range is dirty, so a resync sends whatever it now holds.
   */
  private async guard(change: Promise<void>, offset: number, length: number): Promise<void> {
    try {
      await change;
    } catch (err) {
      this.dirty(offset, length);
      throw err;
    }
  }

  private dirty(offset: number, length: number): void {
    const first = Math.floor(offset / BLOCK);
    const end = Math.ceil((offset + length) / BLOCK);
    for (const m of this.mirrors()) m.markDirty(first, end - first);
  }

  override trim(offset: number, length: number, flags?: WriteFlags): Promise<void> {
    return this.change(offset, length, flags?.fua === true, () => this.next.trim(offset, length, flags));
  }

  override writeZeroes(offset: number, length: number, flags?: ZeroFlags): Promise<void> {
    return this.change(offset, length, flags?.fua === true, () =>
      this.next.writeZeroes(offset, length, flags),
    );
  }

  override async flush(): Promise<void> {
    await this.next.flush();
    const ms = this.mirrors();
    if (ms.length) await Promise.all(ms.map((m) => m.flush()));
  }

  private split(offset: number, length: number, durable: boolean): Promise<void> | undefined {
    const ms = this.mirrors();
    if (ms.length === 0 || length === 0) return undefined;
    const first = Math.floor(offset / BLOCK);
    const end = Math.ceil((offset + length) / BLOCK);
    let range;
    try {
      range = this.store.captureRange(this.volumeId, first, end - first);
    } catch {
      // A block the store cannot describe now (damaged index): the resync will try again.
      this.dirty(offset, length);
      return undefined;
    }
    if (ms.length === 1) return ms[0]!.captured(range, durable);
    return Promise.all(ms.map((m) => m.captured(range, durable))).then(() => undefined);
  }
}
