// Which chunks of a mirrored volume the replica may not hold, kept on disk so a
// restart of the primary resumes the sync instead of starting over (DRBD's
// activity log, at the mirror's 4 MiB chunk grain). A chunk is marked, and the
// mark is durable, before any change to it is applied locally; it is unmarked
// only once the replica holds it durably (lazily written: a lost unmark costs a
// resend, never a miss). A missing file means everything is marked.

import fs from 'node:fs';
import path from 'node:path';

export class ActivityLog {
  private readonly marks: Uint8Array;
  /** Marks known to be on disk (a durable write of them completed). */
  private readonly durable: Uint8Array;
  /** The latest durable write started: it covers every mark made before it runs. */
  private latestDurable: Promise<void> | null = null;
  /** A durable write failed since the latest one started: marks it held need another. */
  private durableFailed = false;
  /** Writes of the file, one after another; each writes the marks as they are when it runs. */
  private chain: Promise<void> = Promise.resolve();
  /** The next durable write, shared by every mark made before it starts. */
  private nextDurable: Promise<void> | null = null;
  private changed = false;
  private closed = false;

  private constructor(
    private readonly file: string,
    private readonly fd: number,
    chunks: number,
    existing: Buffer | null,
  ) {
    this.marks = new Uint8Array(chunks);
    if (existing && existing.length === chunks) this.marks.set(existing);
    else this.marks.fill(1);
    // Read from disk, or created on disk with every chunk marked before this runs.
    this.durable = Uint8Array.from(this.marks);
  }

  /**
   * Opens the log at `file`, or creates it with every chunk marked (written and synced
   * before it is used). `resumed` tells whether marks came from disk.
   */
  static open(file: string, chunks: number): { log: ActivityLog; resumed: boolean } {
    fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
    let existing: Buffer | null = null;
    try {
      existing = fs.readFileSync(file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
    const resumed = existing !== null && existing.length === chunks;
    if (!resumed) {
      const tmp = `${file}.tmp`;
      const fd = fs.openSync(tmp, 'w', 0o600);
      try {
        fs.writeSync(fd, Buffer.alloc(chunks, 1));
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
      fs.renameSync(tmp, file);
      const dir = fs.openSync(path.dirname(file), 'r');
      try {
        fs.fsyncSync(dir);
      } finally {
        fs.closeSync(dir);
      }
    }
    const fd = fs.openSync(file, 'r+');
    if (resumed) {
      try {
        // What was read may be page cache a crashed process never synced (a lazy write,
        // or pages a failed fdatasync left clean): made durable before it is trusted.
        fs.writeSync(fd, existing!, 0, chunks, 0);
        fs.fdatasyncSync(fd);
      } catch (err) {
        fs.closeSync(fd);
        throw err;
      }
    }
    return { log: new ActivityLog(file, fd, chunks, resumed ? existing : null), resumed };
  }

  marked(chunk: number): boolean {
    return this.marks[chunk] === 1;
  }

  /**
   * Marks chunks first..last; null when they all are marked on disk already, else
   * resolves once they are. A chunk another change marked a moment ago is not on disk
   * until that change's write lands: this one waits for it too.
   */
  mark(first: number, last: number): Promise<void> | null {
    let added = false;
    let pending = false;
    for (let c = first; c <= last && c < this.marks.length; c++) {
      if (!this.marks[c]) {
        this.marks[c] = 1;
        added = true;
      } else if (!this.durable[c]) pending = true;
    }
    if ((added || (pending && this.durableFailed)) && !this.nextDurable) {
      // Shared by marks made until its snapshot is taken; later ones need the write after.
      const p: Promise<void> = this.write(true, () => {
        if (this.nextDurable === p) this.nextDurable = null;
      });
      this.nextDurable = p;
      this.latestDurable = p;
      this.durableFailed = false;
    }
    // Writes run one after another: the latest durable one lands after every earlier one.
    return added || pending ? this.latestDurable : null;
  }

  /** The replica holds the chunk durably: unmarked, written to disk later. */
  unmark(chunk: number): void {
    if (!this.marks[chunk]) return;
    this.marks[chunk] = 0;
    this.durable[chunk] = 0;
    this.changed = true;
  }

  /** Writes unmarks made since the last write (no sync: losing them costs a resend). */
  saveLazily(): void {
    if (this.changed) void this.write(false).catch(() => undefined);
  }

  private write(durable: boolean, onSnapshot: () => void = () => undefined): Promise<void> {
    const run = async (): Promise<void> => {
      onSnapshot();
      if (this.closed) return;
      this.changed = false;
      const snapshot = Buffer.from(this.marks);
      try {
        await new Promise<void>((resolve, reject) =>
          fs.write(this.fd, snapshot, 0, snapshot.length, 0, (err, written) =>
            err
              ? reject(err)
              : written !== snapshot.length
                ? reject(new Error(`activity log: short write (${written} of ${snapshot.length} bytes)`))
                : resolve(),
          ),
        );
        if (durable)
          await new Promise<void>((resolve, reject) =>
            fs.fdatasync(this.fd, (err) => (err ? reject(err) : resolve())),
          );
      } catch (err) {
        // Not on disk. The marks stay (a change may be waiting on a later write, which
        // takes them too); the next change to one of them starts another durable write.
        if (durable) this.durableFailed = true;
        throw err;
      }
      if (durable)
        for (let c = 0; c < snapshot.length; c++) if (snapshot[c] && this.marks[c]) this.durable[c] = 1;
    };
    const p = this.chain.then(run, run);
    this.chain = p.catch(() => undefined);
    return p;
  }

  /** Writes what is pending, then closes; `remove` deletes the file (the mirror is gone). */
  async close(remove = false): Promise<void> {
    if (!remove && this.changed) await this.write(true).catch(() => undefined);
    await this.chain;
    this.closed = true;
    fs.closeSync(this.fd);
    if (remove) fs.rmSync(this.file, { force: true });
  }
}
