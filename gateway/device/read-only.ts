import type { Capabilities } from './block-device';
import { BlockError } from './errors';
import { Layer } from './layer';

/** Refuses every change with EPERM; reads, cache and block status pass through. */
export class ReadOnlyLayer extends Layer {
  override capabilities(): Capabilities {
    return { ...this.next.capabilities(), readOnly: true, trim: false, zero: false, fastZero: false };
  }
  override write(_offset: number, _data: Buffer): Promise<void> {
    return refuse();
  }
  override trim(_offset: number, _length: number): Promise<void> {
    return refuse();
  }
  override writeZeroes(_offset: number, _length: number): Promise<void> {
    return refuse();
  }
}

function refuse(): Promise<void> {
  return Promise.reject(new BlockError('EPERM', 'volume is read-only'));
}
