import type { WriteFlags, ZeroFlags } from './block-device';
import { Layer } from './layer';

/**
 * Counts the changes in flight and can hold new ones back: the short I/O
 * barrier a crash-consistent snapshot needs. While paused, writes, trims
 * and zeroes wait; reads and flushes pass. The hot path pays one counter
 * and one check.
 */
export class BarrierLayer extends Layer {
  private inFlight = 0;
  private held: Promise<void> | null = null;
  private drained: (() => void) | null = null;
  private readonly done = (): void => {
    if (--this.inFlight === 0 && this.drained) this.drained();
  };
  private readonly failed = (err: unknown): never => {
    this.done();
    throw err;
  };

  override write(offset: number, data: Buffer, flags?: WriteFlags): Promise<void> {
    if (this.held) return this.held.then(() => this.write(offset, data, flags));
    this.inFlight++;
    return this.next.write(offset, data, flags).then(this.done, this.failed);
  }

  override trim(offset: number, length: number, flags?: WriteFlags): Promise<void> {
    if (this.held) return this.held.then(() => this.trim(offset, length, flags));
    this.inFlight++;
    return this.next.trim(offset, length, flags).then(this.done, this.failed);
  }

  override writeZeroes(offset: number, length: number, flags?: ZeroFlags): Promise<void> {
    if (this.held) return this.held.then(() => this.writeZeroes(offset, length, flags));
    this.inFlight++;
    return this.next.writeZeroes(offset, length, flags).then(this.done, this.failed);
  }

  /**
   * Holds new changes and waits for those in flight: when it resolves, every
   * change acknowledged so far is in the device and none is under way. Call
   * the returned function to let the held ones go. Gives up (and lets them go)
   * when the changes in flight take longer than `timeoutMs`. One pause at a time.
   */
  async pause(timeoutMs: number): Promise<() => void> {
    if (this.held) throw new BarrierBusyError('another pause holds this volume');
    let release!: () => void;
    this.held = new Promise<void>((resolve) => (release = resolve));
    const resume = (): void => {
      this.held = null;
      this.drained = null;
      release();
    };
    if (this.inFlight > 0) {
      let timer: NodeJS.Timeout | undefined;
      const drained = await Promise.race([
        new Promise<boolean>((resolve) => (this.drained = () => resolve(true))),
        new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), timeoutMs))),
      ]);
      clearTimeout(timer);
      if (!drained) {
        const n = this.inFlight;
        resume();
        throw new BarrierBusyError(`${n} change(s) still in flight after ${timeoutMs} ms`);
      }
    }
    return resume;
  }
}

export class BarrierBusyError extends Error {
  override name = 'BarrierBusyError';
}
