// A thin in-memory device for tests and for measuring the NBD path alone:
// 64 KiB pages allocated on first write, absent pages read as zeroes.

import { BlockDevice, Capabilities, Extent, ExtentFlag } from './block-device';

const PAGE = 64 * 1024;

export class MemoryDevice implements BlockDevice {
  private readonly pages = new Map<number, Buffer>();

  constructor(private _size: number) {}

  get size(): number {
    return this._size;
  }

  capabilities(): Capabilities {
    return {
      readOnly: false,
      flush: true,
      fua: true,
      trim: true,
      zero: true,
      fastZero: true,
      cache: true,
      multiConn: true,
    };
  }

  async read(offset: number, into: Buffer): Promise<void> {
    let done = 0;
    while (done < into.length) {
      const pos = offset + done;
      const index = Math.floor(pos / PAGE);
      const inPage = pos - index * PAGE;
      const n = Math.min(PAGE - inPage, into.length - done);
      const page = this.pages.get(index);
      if (page) page.copy(into, done, inPage, inPage + n);
      else into.fill(0, done, done + n);
      done += n;
    }
  }

  async write(offset: number, data: Buffer): Promise<void> {
    let done = 0;
    while (done < data.length) {
      const pos = offset + done;
      const index = Math.floor(pos / PAGE);
      const inPage = pos - index * PAGE;
      const n = Math.min(PAGE - inPage, data.length - done);
      let page = this.pages.get(index);
      if (!page) {
        page = Buffer.alloc(PAGE);
        this.pages.set(index, page);
      }
      data.copy(page, inPage, done, done + n);
      done += n;
    }
  }

  trim(offset: number, length: number): Promise<void> {
    return this.writeZeroes(offset, length);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const index = Math.floor(pos / PAGE);
      const inPage = pos - index * PAGE;
      const n = Math.min(PAGE - inPage, length - done);
      const page = this.pages.get(index);
      // A whole page zeroed is dropped; memory has no "allocated" state worth keeping.
      if (page && n === PAGE) this.pages.delete(index);
      else if (page) page.fill(0, inPage, inPage + n);
      done += n;
    }
  }

  async flush(): Promise<void> {}

  async cache(): Promise<void> {}

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const extents: Extent[] = [];
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const index = Math.floor(pos / PAGE);
      const n = Math.min(PAGE - (pos - index * PAGE), length - done);
      const flags = this.pages.has(index) ? 0 : ExtentFlag.HOLE | ExtentFlag.ZERO;
      const last = extents[extents.length - 1];
      if (last && last.flags === flags) last.length += n;
      else extents.push({ length: n, flags });
      done += n;
    }
    return extents;
  }

  async resize(size: number): Promise<void> {
    if (size < this._size) {
      for (const index of [...this.pages.keys()]) {
        if (index * PAGE >= size) this.pages.delete(index);
      }
      const lastIndex = Math.floor(size / PAGE);
      this.pages.get(lastIndex)?.fill(0, size - lastIndex * PAGE);
    }
    this._size = size;
  }

  async close(): Promise<void> {
    this.pages.clear();
  }

  allocatedBytes(): number {
    return this.pages.size * PAGE;
  }
}
