// One volume as the gateway holds it: its record, its device stack, the NBD
// clients using it, and its mirrors.

import type { BlockDevice } from '../device/block-device';
import type { BarrierLayer } from '../device/barrier';
import type { ClientInfo, NbdExport } from '../nbd/registry';
import type { Mirror } from '../replication/mirror';
import { formatSize } from '../util/size';
import type { VolumeRecord } from './catalog';

export class Volume implements NbdExport {
  readonly clients = new Map<number, ClientInfo>();
  mirrors: Mirror[] = [];
  /** Set while promote or demote swaps the volume's role: no client may attach or write. */
  changingRole: 'promote' | 'demote' | null = null;
  constructor(
    public record: VolumeRecord,
    readonly device: BlockDevice,
    /** The top of a writable dedup volume's stack: holds writes for a snapshot. */
    readonly barrier: BarrierLayer | null = null,
  ) {}
  /**
   * Holds new writes and waits (at most `timeoutMs`, else BarrierBusyError) for those in
   * flight, for a snapshot or a cutover; resolves with the release. Async writers held
   * back by a congested replica (--mirror-buffer) are applied here already and go at
   * once: a slow replica must not keep the barrier from closing.
   */
  async holdWrites(timeoutMs: number): Promise<() => void> {
    const resumes = this.mirrors.map((m) => m.suspendBackpressure());
    const resume = (): void => resumes.forEach((r) => r());
    try {
      const release = this.barrier ? await this.barrier.pause(timeoutMs) : () => undefined;
      return () => {
        release();
        resume();
      };
    } catch (err) {
      resume();
      throw err;
    }
  }

  get name(): string {
    return this.record.name;
  }
  get description(): string {
    return `${this.record.backend} volume, ${formatSize(this.device.size)}${this.record.readOnly ? ', read-only' : ''}`;
  }
}
