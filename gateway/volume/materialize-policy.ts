// The materialize policy: every interval, the dedup volume whose cold
// sequential reads are most fragmented past the threshold is rewritten in
// block order (one volume per round, so the rewriting never piles up).

import type { Logger } from '../util/log';

export interface Materializer {
  fragmentations(): Array<{ name: string; readsPerMiB: number }>;
  materialize(name: string): Promise<unknown>;
}

export class MaterializePolicy {
  private readonly timer: NodeJS.Timeout;
  private running: Promise<void> | null = null;

  constructor(
    private readonly volumes: Materializer,
    /** Reads per MiB above which a volume is rewritten. */
    private readonly threshold: number,
    intervalMs: number,
    private readonly log: Logger,
  ) {
    this.timer = setInterval(() => {
      this.running ??= this.round().finally(() => (this.running = null));
    }, intervalMs);
    this.timer.unref();
  }

  private async round(): Promise<void> {
    const worst = this.volumes
      .fragmentations()
      .filter((v) => v.readsPerMiB > this.threshold)
      .sort((a, b) => b.readsPerMiB - a.readsPerMiB)[0];
    if (!worst) return;
    this.log.info(
      `volume ${worst.name}: ${worst.readsPerMiB.toFixed(1)} reads per MiB, above ${this.threshold}: materializing`,
    );
    try {
      await this.volumes.materialize(worst.name);
    } catch (err) {
      this.log.warn(`materialize of ${worst.name}: ${(err as Error).message}`);
    }
  }

  async close(): Promise<void> {
    clearInterval(this.timer);
    await this.running;
  }
}
