// Builds a volume's stack of layers from its record: the backend at the
// bottom, filters above it. Later layers (dedup store, splitter) slot in here.

import fs from 'node:fs';
import path from 'node:path';
import type { BlockDevice } from '../device/block-device';
import { MemoryDevice } from '../device/memory';
import { RawDevice } from '../device/raw';
import { ReadOnlyLayer } from '../device/read-only';
import { DedupDevice } from '../store/dedup-device';
import type { DedupStore } from '../store/dedup-store';
import type { VolumeRecord } from './catalog';

export function volumeFile(dataDir: string, name: string): string {
  return path.join(dataDir, 'volumes', `${name}.img`);
}

export function openStack(dataDir: string, rec: VolumeRecord, store: () => DedupStore): BlockDevice {
  let device: BlockDevice;
  switch (rec.backend) {
    case 'dedup': {
      const s = store();
      device = new DedupDevice(s, s.volumeId(rec.name), rec.size);
      break;
    }
    case 'memory':
      device = new MemoryDevice(rec.size);
      break;
    case 'raw': {
      const own = rec.path === undefined;
      const file = rec.path ?? volumeFile(dataDir, rec.name);
      if (own) fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
      // The gateway's own file is always opened for writing (it is created and sized here);
      // read-only is the ReadOnlyLayer's job. An operator's file or device is opened as asked.
      device = RawDevice.open({
        path: file,
        size: own ? rec.size : undefined,
        readOnly: !own && rec.readOnly,
      });
      break;
    }
  }
  return rec.readOnly ? new ReadOnlyLayer(device) : device;
}

/**
 * Bytes a raw volume really occupies: its file's blocks (sparse files count only what
 * is written), and the whole size of a block device the operator gave (provisioned).
 */
export function allocatedBytes(dataDir: string, rec: VolumeRecord, size: number): number {
  if (rec.backend !== 'raw') return 0;
  try {
    const st = fs.statSync(rec.path ?? volumeFile(dataDir, rec.name));
    return st.isBlockDevice() ? size : st.blocks * 512;
  } catch {
    return 0;
  }
}

export function removeBackingStore(dataDir: string, rec: VolumeRecord): void {
  if (rec.backend === 'raw' && rec.path === undefined)
    fs.rmSync(volumeFile(dataDir, rec.name), { force: true });
}
