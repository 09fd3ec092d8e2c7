// The append-only segment files. A running store appends to one segment at
// a time and starts a fresh one at every open, so bytes written after the
// last checkpoint of a crashed run are never mistaken for live ones: they sit
// in an old segment's tail that no index entry points at.
//
// A segment nothing points at any more is kept as a spare and written over as
// a later segment (as PostgreSQL recycles WAL files), so appends land in pages
// the page cache already holds and blocks the filesystem already allocated.
// A new page-cache page is the dearest part of an append on a guest whose
// memory the host backs lazily: on this project's VM, writing 1 GiB into a new
// file took 2.4 s of system time, over an old one 0.13 s.

import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { native } from '../../native-bindings';
import { BlockError, toBlockError } from '../device/errors';
import { IoBatcher } from '../device/io-batcher';
import { segmentFileName } from './layout';

/** A segment is closed for appends past this size. */
export const SEGMENT_LIMIT = 256 * 1024 * 1024;
/**
 * Appends of this many bytes since the last sync start one in the background, so the
 * disk writes them back while the index writer commits, not while a checkpoint waits.
 */
const EARLY_SYNC_BYTES = 16 * 1024 * 1024;
/** Spare files kept for reuse: disk space held back from the filesystem, so few. */
const MAX_SPARES = 2;
// Named apart from segment numbers: a restarted store may number segments again past
// its last file, and a spare named after one could then be replaced by another.
const SPARE_NAME = /^spare-[0-9a-f]{12}$/;

/** Whether a file name in the segments directory is a spare's (fsck counts them apart). */
export function isSpareFile(name: string): boolean {
  return SPARE_NAME.test(name);
}

interface Segment {
  fd: number;
  reads: IoBatcher;
  writes: IoBatcher;
  /** Reads in flight on this fd: it is closed only when none is. */
  readers: number;
  /** Removed while reads were in flight: the last of them closes the fd. */
  closeWhenIdle: boolean;
}

export class SegmentFiles {
  private readonly open = new Map<number, Segment>();
  /** Segments deleted while open: a stale hint to one of them must miss, not reopen it. */
  private readonly removed = new Set<number>();
  private current: number;
  private tail = 0;
  /** Segments written since the last sync, and writes still in flight. */
  private dirty = new Set<number>();
  private inflight = new Set<Promise<void>>();
  /**
   * Set once an fdatasync has failed. Linux reports a writeback error once: a retry on
   * the same file returns success with the pages marked clean but never written
   * ("fsyncgate"). Believing it would let a checkpoint commit records that are not on
   * disk, and the compactor delete the only durable copies of the blocks it moved. So,
   * as PostgreSQL does, nothing is synced again until a restart, which rolls back to
   * the last checkpoint that was.
   */
  private syncFailure: BlockError | null = null;
  /** Segment files created since the last sync: the directory must be synced too. */
  private newFiles = false;
  /** Bytes appended since the last sync (checkpoint or early) began. */
  private unsynced = 0;
  /** The early fdatasync in flight (at most one); it settles without rejecting. */
  private earlySync: Promise<void> | null = null;
  private closed = false;
  /** Segment numbers with a file on disk (kept here: listing the directory is a syscall per call). */
  private readonly onDisk = new Set<number>();
  /** Files of retired segments, to be written over as new ones. */
  private readonly spares: string[] = [];
  /** Segments made from a spare: sealed, they lose the old file's tail. */
  private readonly recycled = new Set<number>();
  /** Segments the compactor is walking through a descriptor of its own: not written over. */
  private readonly pinned = new Set<number>();
  /** Segment files started so far (new or recycled): the compactor drops spares when idle. */
  private started = 0;

  constructor(
    readonly dir: string,
    /** Told once, as syncing fails for good (the store logs it at once; writes learn of it later). */
    private readonly onSyncFailure: (err: BlockError) => void = () => undefined,
  ) {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    const existing = this.list();
    for (const n of existing) this.onDisk.add(n);
    this.current = existing.length ? existing[existing.length - 1]! + 1 : 1;
    // A previous run's spares are as good as this run's: their contents are never read.
    for (const f of fs.readdirSync(dir).filter(isSpareFile)) {
      if (this.spares.length < MAX_SPARES) this.spares.push(path.join(dir, f));
      else fs.rmSync(path.join(dir, f), { force: true });
    }
  }

  /** Segment numbers present on disk, ascending. */
  list(): number[] {
    return fs
      .readdirSync(this.dir)
      .map((f) => /^(\d{8})\.seg$/.exec(f)?.[1])
      .filter((n): n is string => n !== undefined)
      .map(Number)
      .sort((a, b) => a - b);
  }

  path(n: number): string {
    return path.join(this.dir, segmentFileName(n));
  }

  /** An open segment; created only for appends (a read of a missing one is an error, not a new file). */
  private segment(n: number, create = false): Segment {
    let s = this.open.get(n);
    if (!s) {
      const file = this.path(n);
      // Being unlinked on the pool: reopened now, nothing would ever close it again.
      if (this.removed.has(n))
        throw toBlockError(
          Object.assign(new Error(`ENOENT: segment ${n} was removed`), { code: 'ENOENT' }),
          `open segment ${file}`,
        );
      let fd = create ? this.fromSpare(n, file) : -1;
      if (fd < 0) {
        try {
          const flags = fs.constants.O_RDWR | (create ? fs.constants.O_CREAT | fs.constants.O_EXCL : 0);
          fd = fs.openSync(file, flags, 0o600);
        } catch (err) {
          if (!(create && (err as NodeJS.ErrnoException).code === 'EEXIST'))
            throw toBlockError(err, `open segment ${file}`);
          fd = fs.openSync(file, fs.constants.O_RDWR);
        }
      }
      // A new file is durable only once its directory entry is: the next sync sees to it.
      if (create) {
        this.newFiles = true;
        this.onDisk.add(n);
        this.started++;
      }
      s = {
        fd,
        reads: new IoBatcher(fd, false, file),
        writes: new IoBatcher(fd, true, file),
        readers: 0,
        closeWhenIdle: false,
      };
      this.open.set(n, s);
    }
    return s;
  }

  /**
   * Gives a spare file segment `n`'s name and opens it; -1 when there is none (or it
   * cannot be had: the caller then creates a new file). Renamed, not linked and
   * unlinked: a crash between the two would leave one file under two names, and a
   * live segment written over as a spare later.
   */
  private fromSpare(n: number, file: string): number {
    if (this.spares.length === 0 || fs.existsSync(file)) return -1;
    const spare = this.spares.pop()!;
    try {
      fs.renameSync(spare, file);
    } catch {
      fs.rm(spare, { force: true }, () => undefined);
      return -1;
    }
    try {
      const fd = fs.openSync(file, fs.constants.O_RDWR);
      this.recycled.add(n);
      return fd;
    } catch {
      fs.rmSync(file, { force: true });
      return -1;
    }
  }

  /**
   * The current segment is closed for appends. One made from a spare is cut to what
   * this life wrote, so that its size is its own and no walk meets the old records.
   */
  private sealCurrent(): void {
    const n = this.current;
    if (!this.recycled.delete(n)) return;
    const s = this.open.get(n);
    if (!s) return;
    const length = this.tail;
    void this.holding(s, () => new Promise<void>((resolve) => fs.ftruncate(s.fd, length, () => resolve())));
  }

  /**
   * Reserves room for `record` at the end of the current segment and starts
   * writing it. Returns where it goes and the write's completion.
   */
  append(record: Buffer): { segment: number; offset: number; written: Promise<void> } {
    const full = this.tail + record.length > SEGMENT_LIMIT;
    const segment = full ? this.current + 1 : this.current;
    const offset = full ? 0 : this.tail;
    // Opened before anything is reserved: a failed open (EMFILE, ENOSPC) throws and leaves
    // no trace, where it used to leave a dirty segment with no file (every sync ENOENT).
    if (full && this.tail > 0) this.sealCurrent();
    const file = this.segment(segment, true);
    this.current = segment;
    this.tail = offset + record.length;
    this.dirty.add(segment);
    const written = file.writes.run(record, offset);
    this.inflight.add(written);
    this.unsynced += record.length;
    if (this.unsynced >= EARLY_SYNC_BYTES) this.syncEarly(file);
    const forget = (): void => void this.inflight.delete(written);
    written.then(forget, (err: unknown) => {
      forget();
      // The disk is full: the spares' space is worth more to the next write than their pages.
      if ((err as { code?: unknown }).code === 'ENOSPC') void this.dropSpares();
      // The failed record leaves a gap the compactor's walk cannot cross: seal the segment
      // so nothing follows the gap.
      if (this.current === segment) this.roll();
    });
    return { segment, offset, written };
  }

  /**
   * Fills `into` from `offset` of a segment if the page cache holds all of it,
   * without blocking; false when it does not (read() then goes to the pool).
   */
  readCached(segment: number, offset: number, into: Buffer): boolean {
    if (this.removed.has(segment)) return false;
    const s = this.segment(segment);
    try {
      return native.readNoWait(s.fd, into, offset) === into.length;
    } catch (err) {
      throw toBlockError(err, `read segment ${segment}@${offset}`);
    }
  }

  /**
   * Reads `length` bytes at `offset` of a segment: inline when cached, else on the
   * pool. Into `into` (of that length) when given.
   */
  read(segment: number, offset: number, length: number, into?: Buffer): Promise<Buffer> {
    let s: Segment;
    try {
      s = this.segment(segment);
    } catch (err) {
      return Promise.reject(err);
    }
    const buf = into ?? Buffer.allocUnsafe(length);
    let n: number;
    try {
      n = native.readNoWait(s.fd, buf, offset);
    } catch (err) {
      return Promise.reject(toBlockError(err, `read segment ${segment}@${offset}`));
    }
    if (n === length) return Promise.resolve(buf);
    return this.holding(s, () => s.reads.run(buf, offset)).then(() => buf);
  }

  /**
   * Runs `job` with the segment's descriptor, which stays open until the job settles
   * even if the segment is removed meanwhile: for a pool job that reads the file
   * itself (pread and decode in one round trip). Its failures come back as
   * BlockErrors naming the segment.
   */
  readWith<T>(segment: number, offset: number, job: (fd: number) => Promise<T>): Promise<T> {
    let s: Segment;
    try {
      s = this.segment(segment);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.holding(s, () => job(s.fd)).catch((err: unknown) => {
      throw toBlockError(err, `read segment ${segment}@${offset}`);
    });
  }

  /** Keeps `s`'s descriptor open while `io` runs (a removal closes it afterwards). */
  private holding<T>(s: Segment, io: () => Promise<T>): Promise<T> {
    s.readers++;
    const done = (): void => {
      if (--s.readers === 0 && s.closeWhenIdle) fs.close(s.fd, () => undefined);
    };
    let running: Promise<T>;
    try {
      running = io();
    } catch (err) {
      done();
      return Promise.reject(err);
    }
    return running.then(
      (value) => {
        done();
        return value;
      },
      (err: unknown) => {
        done();
        throw err;
      },
    );
  }

  /** The segment appends go to. */
  get currentSegment(): number {
    return this.current;
  }

  /** Bytes appended to the current segment so far. */
  get currentBytes(): number {
    return this.tail;
  }

  /** Seals the current segment: later appends start a new one. */
  roll(): void {
    if (this.tail === 0) return;
    this.sealCurrent();
    this.current++;
    this.tail = 0;
  }

  size(n: number): number {
    try {
      return fs.statSync(this.path(n)).size;
    } catch {
      return 0;
    }
  }

  /**
   * Deletes a sealed segment. Reads still in flight on it finish on the open fd, the
   * last one closing it: closed earlier, its number could be reused by another file
   * under the read. The unlink runs on the thread pool: dropping a 256 MiB file's
   * cached pages takes the kernel ~100 ms, which clients' requests must not wait out.
   * Resolves true when the file is gone, false when it was kept as a spare.
   */
  async remove(n: number): Promise<boolean> {
    if (n === this.current) throw new Error(`segment ${n} is still being appended to`);
    this.removed.add(n);
    this.onDisk.delete(n);
    this.recycled.delete(n);
    // Left dirty, every later sync would fail opening it (and with it every checkpoint).
    this.dirty.delete(n);
    const s = this.open.get(n);
    let reading = false;
    if (s) {
      this.open.delete(n);
      reading = s.readers > 0;
      if (reading) s.closeWhenIdle = true;
      else fs.closeSync(s.fd);
    }
    // Kept as a spare only when nothing can read it again: a read in flight, or the
    // compactor's walk, would meet the next segment's records being written over it.
    if (!reading && !this.pinned.has(n) && this.spares.length < MAX_SPARES && !this.closed) {
      const spare = path.join(this.dir, `spare-${crypto.randomBytes(6).toString('hex')}`);
      try {
        fs.renameSync(this.path(n), spare);
        this.spares.push(spare);
        return false;
      } catch {
        // Gone or not renameable: deleted below like any other.
      }
    }
    await fs.promises.rm(this.path(n), { force: true });
    return true;
  }

  /** Sealed segments with a file on disk. */
  sealed(): number[] {
    return [...this.onDisk].filter((n) => n < this.current);
  }

  /** Keeps segment `n` from being written over as a spare while the compactor reads it. */
  pin(n: number): void {
    this.pinned.add(n);
  }

  unpin(n: number): void {
    this.pinned.delete(n);
  }

  /** Segment files started so far. */
  get startedCount(): number {
    return this.started;
  }

  /** Bytes held in spare files. */
  spareBytes(): number {
    return this.spares.reduce((sum, f) => {
      try {
        return sum + fs.statSync(f).size;
      } catch {
        return sum;
      }
    }, 0);
  }

  /** Deletes the spare files, giving their space back to the filesystem; returns their bytes. */
  async dropSpares(): Promise<number> {
    const bytes = this.spareBytes();
    const files = this.spares.splice(0);
    await Promise.all(files.map((f) => fs.promises.rm(f, { force: true })));
    return bytes;
  }

  /**
   * Waits for the writes started so far (not later ones: under steady load there is
   * always one more in flight), then makes them durable.
   */
  async sync(): Promise<void> {
    if (this.syncFailure) throw this.syncFailure;
    const started = [...this.inflight];
    // Taken now: segments dirtied from here on belong to the next sync.
    const dirty = [...this.dirty];
    this.dirty = new Set();
    const newFiles = this.newFiles;
    this.newFiles = false;
    this.unsynced = 0;
    try {
      const outcomes = await Promise.allSettled(started);
      // A write of this epoch that failed is being undone: this checkpoint must not
      // commit anything that pointed at it, so it fails and its overlay is merged back.
      const failed = outcomes.find((o): o is PromiseRejectedResult => o.status === 'rejected');
      if (failed) throw failed.reason;
      await Promise.all(
        dirty.map(
          (n) =>
            new Promise<void>((resolve, reject) =>
              fs.fdatasync(this.segment(n).fd, (err) =>
                err ? reject(this.failSync(toBlockError(err, `fdatasync segment ${n}`))) : resolve(),
              ),
            ),
        ),
      );
      if (newFiles)
        await syncDirectory(this.dir).catch((err: unknown) => {
          throw this.failSync(toBlockError(err, `fsync ${this.dir}`));
        });
      // Linux tells one fdatasync of a file about a writeback error, not every caller: an
      // early sync running beside the ones above may have taken the error they needed.
      await this.settleEarlySync();
      if (this.syncFailure) throw this.syncFailure;
    } catch (err) {
      for (const n of dirty) this.dirty.add(n);
      if (newFiles) this.newFiles = true;
      throw err;
    }
  }

  /**
   * An fdatasync of the segment being appended to, whose outcome nobody waits for: it
   * gives the disk the bytes so far (and those written meanwhile) early. It still counts:
   * Linux reports a writeback error once, so one it reports fails syncing as a
   * checkpoint's would.
   */
  private syncEarly(s: Segment): void {
    if (this.earlySync || this.syncFailure) return;
    this.unsynced = 0;
    // Held like a read, so that removing the segment meanwhile cannot close the descriptor
    // under it (and hand its number to another file).
    const done = this.holding(
      s,
      () =>
        new Promise<void>((resolve) =>
          fs.fdatasync(s.fd, (err) => {
            if (err && !this.closed) this.failSync(toBlockError(err, 'fdatasync segment (early)'));
            resolve();
          }),
        ),
    ).finally(() => {
      if (this.earlySync === done) this.earlySync = null;
    });
    this.earlySync = done;
  }

  /** Waits until no early sync is in flight (one started meanwhile included). */
  async settleEarlySync(): Promise<void> {
    while (this.earlySync) await this.earlySync;
  }

  /** Whether syncing has failed for good (see syncFailure). */
  get failed(): BlockError | null {
    return this.syncFailure;
  }

  private failSync(err: BlockError): BlockError {
    if (!this.syncFailure) {
      this.syncFailure = new BlockError(
        'EIO',
        `${err.message}; writes since the last checkpoint may not be on disk, and this store takes no ` +
          'more until the gateway restarts (it then opens at its last durable checkpoint)',
        { cause: err },
      );
      this.onSyncFailure(this.syncFailure);
    }
    return this.syncFailure;
  }

  /** Bytes of all segment files on disk (one being removed meanwhile counts as gone). */
  totalBytes(): number {
    return this.list().reduce((sum, n) => sum + this.size(n), 0);
  }

  close(): void {
    this.closed = true;
    // The next run starts a new segment: this one keeps only what it wrote.
    const last = this.open.get(this.current);
    if (last && this.recycled.delete(this.current)) {
      try {
        fs.ftruncateSync(last.fd, this.tail);
      } catch {
        // Its old tail stays, garbage the compactor will count and walk past.
      }
    }
    for (const s of this.open.values()) fs.closeSync(s.fd);
    this.open.clear();
  }
}

/** fsync of a directory, so the files created in it survive a power loss. */
function syncDirectory(dir: string): Promise<void> {
  return new Promise((resolve, reject) => {
    fs.open(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY, (err, fd) => {
      if (err) return reject(toBlockError(err, `open ${dir}`));
      fs.fsync(fd, (syncErr) => {
        fs.close(fd, () => (syncErr ? reject(toBlockError(syncErr, `fsync ${dir}`)) : resolve()));
      });
    });
  });
}
