// Segment files' syncing: the early fdatasync that appends start in the background
// counts like a checkpoint's, since Linux reports a writeback error only once. And
// their recycling: a removed segment's file is written over as a later one, unless
// something may still read it.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { SegmentFiles } from '../../gateway/store/segments';

const MiB = 1 << 20;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-segments-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));
let n = 0;

/** An EIO as fdatasync reports a lost writeback. */
function eio(): NodeJS.ErrnoException {
  return Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO', errno: -5 });
}

/**
 * Replaces fs.fdatasync while `run` goes on; `answer` decides each call's outcome (an
 * error reported after `delay` ms, or the real call).
 */
async function withFdatasync(
  answer: (call: number) => NodeJS.ErrnoException | null,
  run: (calls: () => number) => Promise<void>,
  delay = 0,
): Promise<void> {
  const real = fs.fdatasync;
  let calls = 0;
  fs.fdatasync = ((fd: number, cb: (err: NodeJS.ErrnoException | null) => void) => {
    const err = answer(++calls);
    if (err) setTimeout(() => cb(err), delay);
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

/** Lets the fdatasync callbacks queued by setTimeout(0) run. */
const turn = (): Promise<void> => new Promise((resolve) => setTimeout(resolve, 5));

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
    const told: string[] = [];
    const segments = new SegmentFiles(path.join(tmp, `s${n++}`), (err) => told.push(err.message));
    await withFdatasync(eio, async () => {
      await appendMiB(segments, 16);
      await turn();
    });
    assert.match(segments.failed?.message ?? '', /fdatasync segment \(early\)/);
    assert.equal(told.length, 1, 'the failure is reported once, as it happens');
    await assert.rejects(segments.sync(), /fdatasync segment \(early\)/);
    segments.close();
  });

  it("fails a checkpoint's sync when an early one beside it took the writeback error", async () => {
    const segments = new SegmentFiles(path.join(tmp, `s${n++}`));
    // The early sync learns of the error (a moment later); the checkpoint's, asking after
    // it, is told nothing, as Linux tells only one caller.
    await withFdatasync(
      (call) => (call === 1 ? eio() : null),
      async (calls) => {
        await appendMiB(segments, 16);
        assert.equal(calls(), 1);
        await assert.rejects(segments.sync(), /fdatasync segment \(early\)/);
      },
      20,
    );
    segments.close();
  });
});

/** Segments whose current one (2) is segment 1's 3 MiB file, removed and written over with 1 MiB. */
async function recycledSegment(): Promise<SegmentFiles> {
  const segments = new SegmentFiles(path.join(tmp, `s${n++}`));
  await appendMiB(segments, 3);
  segments.roll();
  await segments.remove(1);
  await appendMiB(segments, 1);
  return segments;
}

describe('segment recycling', () => {
  it('writes a new segment over the file of one removed before', async () => {
    const segments = await recycledSegment();
    assert.equal(fs.existsSync(segments.path(1)), false);
    assert.equal(segments.currentSegment, 2);
    // The old file's length: its last two MiB are the old segment's, written over later.
    assert.equal(segments.size(2), 3 * MiB);
    const back = await segments.read(2, 0, MiB);
    assert.ok(back.equals(Buffer.alloc(MiB, 0)));
    segments.close();
  });

  it('cuts a recycled segment to what it wrote once it is sealed', async () => {
    const segments = await recycledSegment();
    assert.equal(segments.size(2), 3 * MiB);
    segments.roll();
    await turn();
    assert.equal(segments.size(2), MiB);
    segments.close();
  });

  it('cuts a recycled segment to what it wrote when closed while current', async () => {
    const segments = await recycledSegment();
    const file = segments.path(2);
    segments.close();
    assert.equal(fs.statSync(file).size, MiB);
  });

  it('deletes rather than recycles a segment with a read in flight', async () => {
    const segments = new SegmentFiles(path.join(tmp, `s${n++}`));
    await appendMiB(segments, 2);
    segments.roll();
    let release!: () => void;
    const reading = segments.readWith(1, 0, () => new Promise<void>((r) => (release = r)));
    await segments.remove(1);
    release();
    await reading;
    assert.equal(segments.spareBytes(), 0);
    assert.deepEqual(
      fs.readdirSync(segments.dir).filter((f) => f.startsWith('spare-')),
      [],
    );
    segments.close();
  });

  it('deletes rather than recycles a segment the compactor has pinned', async () => {
    const segments = new SegmentFiles(path.join(tmp, `s${n++}`));
    await appendMiB(segments, 2);
    segments.roll();
    segments.pin(1);
    await segments.remove(1);
    segments.unpin(1);
    assert.equal(segments.spareBytes(), 0);
    segments.close();
  });

  it('keeps at most two spares, and gives their space back when told to', async () => {
    const segments = new SegmentFiles(path.join(tmp, `s${n++}`));
    for (let i = 0; i < 3; i++) {
      await appendMiB(segments, 1);
      segments.roll();
    }
    for (const seg of [1, 2, 3]) await segments.remove(seg);
    assert.equal(segments.spareBytes(), 2 * MiB);
    await segments.dropSpares();
    assert.equal(segments.spareBytes(), 0);
    assert.deepEqual(fs.readdirSync(segments.dir), []);
    segments.close();
  });

  it('reuses the spares a previous run left', async () => {
    const dir = path.join(tmp, `s${n++}`);
    const first = new SegmentFiles(dir);
    await appendMiB(first, 2);
    first.roll();
    await first.remove(1);
    first.close();
    const second = new SegmentFiles(dir);
    await appendMiB(second, 1);
    assert.equal(second.size(second.currentSegment), 2 * MiB);
    second.close();
  });

  it(
    'gives the spares back when a write finds the disk full',
    { skip: process.getuid?.() === 0 ? false : 'needs root to mount a small tmpfs' },
    async () => {
      const mnt = fs.mkdtempSync(path.join(tmp, 'full-'));
      assert.equal(spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', mnt]).status, 0);
      let segments: SegmentFiles | undefined;
      try {
        segments = new SegmentFiles(path.join(mnt, 'segments'));
        await appendMiB(segments, 1);
        segments.roll();
        await appendMiB(segments, 1);
        await segments.remove(1);
        assert.equal(segments.spareBytes(), MiB);
        // Leave less room than the next MiB needs.
        const st = fs.statfsSync(mnt);
        fs.writeFileSync(path.join(mnt, 'filler'), Buffer.alloc(st.bavail * st.bsize - MiB / 2));
        await assert.rejects(segments.append(Buffer.alloc(MiB, 7)).written, { code: 'ENOSPC' });
        await turn();
        assert.equal(segments.spareBytes(), 0);
        // The spare is deleted in the background: under load one turn was not always enough.
        const room = (): number => fs.statfsSync(mnt).bavail * fs.statfsSync(mnt).bsize;
        for (let i = 0; i < 200 && room() < MiB; i++) await turn();
        // The spare's MiB is free again: the next segment fits.
        await segments.append(Buffer.alloc(MiB, 8)).written;
      } finally {
        segments?.close();
        spawnSync('umount', ['-l', mnt]);
      }
    },
  );
});
