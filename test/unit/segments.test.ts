// Segment files' syncing: the early fdatasync that appends start in the background
// counts like a checkpoint's, since Linux reports a writeback error only once.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { SegmentFiles } from '../../gateway/store/segments';

const MiB = 1 << 20;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-segments-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));
let n = 0;

/** Replaces fs.fdatasync while `run` goes on; `answer` decides each call's outcome. */
async function withFdatasync(
  answer: () => NodeJS.ErrnoException | null,
  run: (calls: () => number) => Promise<void>,
): Promise<void> {
  const real = fs.fdatasync;
  let calls = 0;
  fs.fdatasync = ((fd: number, cb: (err: NodeJS.ErrnoException | null) => void) => {
    calls++;
    const err = answer();
    if (err) setImmediate(() => cb(err));
    else real(fd, cb);
  }) as typeof fs.fdatasync;
  try {
    await run(() => calls);
  } finally {
    fs.fdatasync = real;
  }
}

/** Appends `mib` MiB in 1 MiB records and waits for their writes. */
async function appendMiB(segments: SegmentFiles, mib: number): Promise<void> {
  const written: Promise<void>[] = [];
  for (let i = 0; i < mib; i++) written.push(segments.append(Buffer.alloc(MiB, i)).written);
  await Promise.all(written);
}

/** Lets the fdatasync callbacks queued by setImmediate run. */
const turn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

describe('segment syncing', () => {
  it('starts an fdatasync in the background once 16 MiB are appended unsynced', async () => {
    const segments = new SegmentFiles(path.join(tmp, `s${n++}`));
    await withFdatasync(
      () => null,
      async (calls) => {
        await appendMiB(segments, 15);
        assert.equal(calls(), 0);
        await appendMiB(segments, 1);
        assert.equal(calls(), 1);
      },
    );
    await segments.sync();
    segments.close();
  });

  it('fails every later sync when a background fdatasync reports a writeback error', async () => {
    const segments = new SegmentFiles(path.join(tmp, `s${n++}`));
    await withFdatasync(
      () => Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO', errno: -5 }),
      async () => {
        await appendMiB(segments, 16);
        await turn();
      },
    );
    assert.equal(segments.failed?.code, 'EIO');
    await assert.rejects(segments.sync(), (err: Error & { code?: string }) => err.code === 'EIO');
    segments.close();
  });
});
