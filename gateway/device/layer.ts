import type { BlockDevice, Capabilities, Extent, WriteFlags, ZeroFlags } from './block-device';

/**
 * A filter over another device that passes everything through. Subclasses
 * override only what they change, as nbdkit filters do.
 */
export class Layer implements BlockDevice {
  constructor(protected readonly next: BlockDevice) {}

  get size(): number {
    return this.next.size;
  }
  capabilities(): Capabilities {
    return this.next.capabilities();
  }
  read(offset: number, into: Buffer): Promise<void> {
    return this.next.read(offset, into);
  }
  write(offset: number, data: Buffer, flags?: WriteFlags): Promise<void> {
    return this.next.write(offset, data, flags);
  }
  trim(offset: number, length: number, flags?: WriteFlags): Promise<void> {
    return this.next.trim(offset, length, flags);
  }
  writeZeroes(offset: number, length: number, flags?: ZeroFlags): Promise<void> {
    return this.next.writeZeroes(offset, length, flags);
  }
  flush(): Promise<void> {
    return this.next.flush();
  }
  cache(offset: number, length: number): Promise<void> {
    return this.next.cache(offset, length);
  }
  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.next.blockStatus(offset, length);
  }
  resize(size: number): Promise<void> {
    return this.next.resize(size);
  }
  close(): Promise<void> {
    return this.next.close();
  }
  allocatedBytes(): number | undefined {
    return this.next.allocatedBytes?.();
  }
}
