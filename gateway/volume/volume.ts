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
  get name(): string {
    return this.record.name;
  }
  get description(): string {
    return `${this.record.backend} volume, ${formatSize(this.device.size)}${this.record.readOnly ? ', read-only' : ''}`;
  }
}
