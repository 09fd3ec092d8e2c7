import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { ActivityLog } from '../../gateway/replication/activity-log';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-al-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));
let n = 0;

/** A new 8-chunk log with every chunk unmarked (a new one starts all marked), and its file. */
function blankLog(): { file: string; log: ActivityLog } {
  const file = path.join(tmp, `a${n++}.al`);
  const { log } = ActivityLog.open(file, 8);
  for (let c = 0; c < 8; c++) log.unmark(c);
  return { file, log };
}

/** The next fdatasync fails (EIO) a moment later, as a failing disk's would; returns an undo. */
function failNextFdatasync(): () => void {
  const fdatasync = fs.fdatasync;
  fs.fdatasync = ((_fd: number, callback: (err: NodeJS.ErrnoException | null) => void) => {
    fs.fdatasync = fdatasync;
    setImmediate(() => callback(Object.assign(new Error('EIO: fdatasync (injected)'), { code: 'EIO' })));
  }) as typeof fs.fdatasync;
  return () => (fs.fdatasync = fdatasync);
}

describe('activity log', () => {
  it('starts with every chunk marked when there is no file', async () => {
    const { log, resumed } = ActivityLog.open(path.join(tmp, `a${n++}.al`), 8);
    assert.equal(resumed, false);
    for (let c = 0; c < 8; c++) assert.ok(log.marked(c));
    await log.close();
  });

  it('resumes from the marks on disk after unmarks and new marks', async () => {
    const file = path.join(tmp, `a${n++}.al`);
    let { log } = ActivityLog.open(file, 8);
    for (let c = 0; c < 8; c++) log.unmark(c);
    log.saveLazily();
    await log.mark(5, 6);
    await log.close();
    ({ log } = ActivityLog.open(file, 8));
    assert.deepEqual(
      Array.from({ length: 8 }, (_, c) => log.marked(c)),
      [false, false, false, false, false, true, true, false],
    );
    await log.close();
  });

  it('makes a mark made during a durable write wait for the next write', async () => {
    const { file, log } = blankLog();
    const first = log.mark(0, 0)!;
    await Promise.resolve(); // the write has taken its snapshot
    await Promise.resolve();
    const second = log.mark(1, 1)!;
    assert.notEqual(second, first);
    await second;
    // What the second promise promised is on disk.
    assert.equal(fs.readFileSync(file)[1], 1);
    await first;
    await log.close();
  });

  it('shares one durable write among the marks made before it starts', async () => {
    const { log } = blankLog();
    const a = log.mark(2, 2);
    const b = log.mark(3, 4);
    assert.equal(a, b);
    await a;
    assert.equal(log.mark(3, 3), null, 'already marked on disk');
    await log.close();
  });

  it('makes a change to a chunk whose mark is still on its way to disk wait for it', async () => {
    const { file, log } = blankLog();
    const first = log.mark(2, 2)!;
    const again = log.mark(2, 2);
    assert.notEqual(again, null, 'the mark is in memory only');
    await again;
    assert.equal(fs.readFileSync(file)[2], 1, 'what it waited for is on disk');
    await first;
    await log.close();
  });

  it('writes a mark again after the durable write of it fails', async () => {
    const { log } = blankLog();
    const restore = failNextFdatasync();
    try {
      await assert.rejects(log.mark(4, 4)!, /injected/);
    } finally {
      restore();
    }
    const retry = log.mark(4, 4);
    assert.notEqual(retry, null, 'not taken as marked');
    await retry;
    assert.equal(log.mark(4, 4), null);
    await log.close();
  });

  it('deletes its file when the mirror is removed', async () => {
    const file = path.join(tmp, `a${n++}.al`);
    const { log } = ActivityLog.open(file, 4);
    await log.close(true);
    assert.equal(fs.existsSync(file), false);
  });

  it('keeps a mark whose write failed for the later write a change waits on', async () => {
    const { file, log } = blankLog();
    const restore = failNextFdatasync();
    try {
      const a = log.mark(2, 2)!;
      a.catch(() => undefined);
      await Promise.resolve(); // a's write has taken its snapshot
      await Promise.resolve();
      const c = log.mark(5, 5)!; // the next durable write
      const b = log.mark(2, 2)!; // chunk 2 is not on disk yet: b waits, on the latest write
      assert.equal(b, c);
      await assert.rejects(a, /injected/);
      await b;
    } finally {
      restore();
    }
    const disk = fs.readFileSync(file);
    assert.equal(disk[2], 1, 'what b waited for is on disk');
    assert.equal(disk[5], 1);
    await log.close();
  });

  it('syncs the marks it resumes from before trusting them', async () => {
    const file = path.join(tmp, `a${n++}.al`);
    let { log } = ActivityLog.open(file, 8);
    await log.close();
    const fdatasyncSync = fs.fdatasyncSync;
    let synced = 0;
    fs.fdatasyncSync = (fd: number) => {
      synced++;
      fdatasyncSync(fd);
    };
    try {
      ({ log } = ActivityLog.open(file, 8));
    } finally {
      fs.fdatasyncSync = fdatasyncSync;
    }
    assert.equal(synced, 1, 'page cache a crashed process left is made durable first');
    await log.close();
  });

  it('fails a mark whose write of the file came up short, and writes it again', async () => {
    const { file, log } = blankLog();
    const write = fs.write;
    (fs as { write: unknown }).write = (...args: unknown[]) => {
      fs.write = write;
      const callback = args[args.length - 1] as (err: null, written: number) => void;
      setImmediate(() => callback(null, 1)); // as ENOSPC part-way through can
    };
    try {
      await assert.rejects(log.mark(6, 6)!, /short write/);
    } finally {
      fs.write = write;
    }
    await log.mark(6, 6);
    assert.equal(fs.readFileSync(file)[6], 1);
    assert.equal(log.mark(6, 6), null);
    await log.close();
  });
});
