// The `raw` backend: a sparse file per volume, or an existing block device.
// TRIM and WRITE_ZEROES go through fallocate (punch hole / zero range) and
// block status through SEEK_DATA/SEEK_HOLE, so holes stay holes end to end.

import fs from 'node:fs';
import { native } from '../../native-bindings';
import { BlockDevice, Capabilities, Extent, ExtentFlag, WriteFlags, ZeroFlags } from './block-device';
import { BlockError, toBlockError } from './errors';
import { IoBatcher } from './io-batcher';

const ZERO_CHUNK = 1024 * 1024;
/** Extents reported per BLOCK_STATUS request; a client asks again for the rest. */
const MAX_EXTENTS = 1024;

export interface RawOptions {
  path: string;
  /** Size of a file to create or grow to; ignored for block devices. */
  size?: number;
  readOnly?: boolean;
}

export class RawDevice implements BlockDevice {
  private zeroes: Buffer | null = null;
  /** Whether fallocate modes work here; learnt on first use. */
  private punchWorks = true;
  /** Try cached reads inline first (RWF_NOWAIT); off for block devices, where it rarely hits. */
  private readonly nowait: boolean;
  private readonly reads: IoBatcher;
  private readonly writes: IoBatcher;
  private zeroRangeWorks = true;

  private constructor(
    private readonly fd: number,
    private _size: number,
    private readonly isBlockDevice: boolean,
    readonly path: string,
  ) {
    this.nowait = !isBlockDevice && process.env.BLOCKGATE_RAW_NOWAIT !== '0';
    this.reads = new IoBatcher(fd, false, path);
    this.writes = new IoBatcher(fd, true, path);
  }

  static open(opts: RawOptions): RawDevice {
    let fd: number;
    try {
      fd = fs.openSync(opts.path, opts.readOnly ? 'r' : fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
    } catch (err) {
      throw toBlockError(err, `open ${opts.path}`);
    }
    try {
      const st = fs.fstatSync(fd);
      if (st.isBlockDevice()) return new RawDevice(fd, native.blockDeviceSize(fd), true, opts.path);
      if (!st.isFile()) throw new BlockError('EINVAL', `${opts.path} is neither a file nor a block device`);
      let size = st.size;
      if (opts.size !== undefined && opts.size !== size) {
        if (opts.readOnly)
          throw new BlockError('EINVAL', `${opts.path} is ${size} bytes, expected ${opts.size}`);
        fs.ftruncateSync(fd, opts.size);
        size = opts.size;
      }
      return new RawDevice(fd, size, false, opts.path);
    } catch (err) {
      fs.closeSync(fd);
      throw toBlockError(err, `open ${opts.path}`);
    }
  }

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
      fastZero: this.zeroRangeWorks || this.punchWorks,
      cache: true,
      multiConn: true,
    };
  }

  read(offset: number, into: Buffer): Promise<void> {
    if (this.nowait) {
      let n: number;
      try {
        n = native.readNoWait(this.fd, into, offset);
      } catch (err) {
        return Promise.reject(toBlockError(err, `read ${this.path}@${offset}`));
      }
      if (n === into.length) return Promise.resolve();
      if (n > 0) return this.reads.run(into.subarray(n), offset + n);
    }
    return this.reads.run(into, offset);
  }

  async write(offset: number, data: Buffer, flags?: WriteFlags): Promise<void> {
    await this.pwrite(offset, data);
    if (flags?.fua) await this.flush();
  }

  private pwrite(offset: number, data: Buffer): Promise<void> {
    return this.writes.run(data, offset);
  }

  async trim(offset: number, length: number, flags?: WriteFlags): Promise<void> {
    // TRIM is advisory: where holes cannot be punched, doing nothing is correct.
    if (this.punchWorks && (await this.fallocate('punch', offset, length)) && flags?.fua) await this.flush();
  }

  async writeZeroes(offset: number, length: number, flags?: ZeroFlags): Promise<void> {
    let done = false;
    if (!flags?.noHole && this.punchWorks) done = await this.fallocate('punch', offset, length);
    if (!done && this.zeroRangeWorks) done = await this.fallocate('zero', offset, length);
    if (!done) {
      if (flags?.fastZero) throw new BlockError('ENOTSUP', 'zeroing here means writing zeroes');
      await this.writeZeroBytes(offset, length);
    }
    if (flags?.fua) await this.flush();
  }

  /** Returns false when the filesystem or device does not support the mode (and remembers that). */
  private async fallocate(mode: 'punch' | 'zero', offset: number, length: number): Promise<boolean> {
    const bits =
      mode === 'punch'
        ? native.FALLOC_FL_PUNCH_HOLE | native.FALLOC_FL_KEEP_SIZE
        : native.FALLOC_FL_ZERO_RANGE | native.FALLOC_FL_KEEP_SIZE;
    try {
      await native.fallocate(this.fd, bits, offset, length);
      return true;
    } catch (err) {
      const code = (err as { code?: string }).code;
      if (code === 'EOPNOTSUPP' || code === 'ENOTTY' || code === 'ENODEV') {
        if (mode === 'punch') this.punchWorks = false;
        else this.zeroRangeWorks = false;
        return false;
      }
      throw toBlockError(err, `fallocate ${this.path}@${offset}+${length}`);
    }
  }

  private async writeZeroBytes(offset: number, length: number): Promise<void> {
    this.zeroes ??= Buffer.alloc(ZERO_CHUNK);
    for (let done = 0; done < length; done += ZERO_CHUNK) {
      const n = Math.min(ZERO_CHUNK, length - done);
      await this.pwrite(offset + done, this.zeroes.subarray(0, n));
    }
  }

  flush(): Promise<void> {
    return new Promise((resolve, reject) => {
      fs.fdatasync(this.fd, (err) => (err ? reject(toBlockError(err, `fdatasync ${this.path}`)) : resolve()));
    });
  }

  async cache(offset: number, length: number): Promise<void> {
    try {
      native.willNeed(this.fd, offset, length);
    } catch (err) {
      throw toBlockError(err, `fadvise ${this.path}`);
    }
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const end = offset + length;
    if (this.isBlockDevice) return [{ length, flags: 0 }];
    const extents: Extent[] = [];
    let pos = offset;
    try {
      while (pos < end && extents.length < MAX_EXTENTS) {
        let data = native.seek(this.fd, pos, native.SEEK_DATA);
        if (data === -1 || data > end) data = end;
        if (data > pos) {
          extents.push({ length: data - pos, flags: ExtentFlag.HOLE | ExtentFlag.ZERO });
          pos = data;
          continue;
        }
        let hole = native.seek(this.fd, pos, native.SEEK_HOLE);
        if (hole === -1 || hole > end) hole = end;
        extents.push({ length: hole - pos, flags: 0 });
        pos = hole;
      }
    } catch (err) {
      throw toBlockError(err, `seek ${this.path}@${pos}`);
    }
    return extents;
  }

  async resize(size: number): Promise<void> {
    if (this.isBlockDevice)
      throw new BlockError('EINVAL', `${this.path} is a block device; its size is fixed`);
    try {
      fs.ftruncateSync(this.fd, size);
    } catch (err) {
      throw toBlockError(err, `truncate ${this.path}`);
    }
    this._size = size;
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => fs.close(this.fd, () => resolve()));
  }
}
