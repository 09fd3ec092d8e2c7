// One gateway per data directory: an exclusive flock(2) on DATA/gateway.lock,
// held for the life of the process and released by the kernel if it dies.

import fs from 'node:fs';
import path from 'node:path';
import { flockSync } from 'fs-ext';
import { DataDirLockedError } from '../errors';

export class DataDirLock {
  private constructor(private readonly fd: number) {}

  static acquire(dataDir: string): DataDirLock {
    const file = path.join(dataDir, 'gateway.lock');
    const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
    try {
      flockSync(fd, 'exnb');
    } catch (err) {
      const holder = fs.readFileSync(file, 'utf8').trim();
      fs.closeSync(fd);
      if (
        (err as NodeJS.ErrnoException).code === 'EAGAIN' ||
        (err as NodeJS.ErrnoException).code === 'EWOULDBLOCK'
      ) {
        throw new DataDirLockedError(
          `data directory ${dataDir} is in use by another gateway${holder ? ` (pid ${holder})` : ''}`,
        );
      }
      throw err;
    }
    fs.ftruncateSync(fd, 0);
    fs.writeSync(fd, `${process.pid}\n`, 0);
    return new DataDirLock(fd);
  }

  release(): void {
    flockSync(this.fd, 'un');
    fs.closeSync(this.fd);
  }
}
