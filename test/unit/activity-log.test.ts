import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { ActivityLog } from '../../gateway/replication/activity-log';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-al-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));
let n = 0;

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
    const file = path.join(tmp, `a${n++}.al`);
    const { log } = ActivityLog.open(file, 8);
    for (let c = 0; c < 8; c++) log.unmark(c);
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
    const { log } = ActivityLog.open(path.join(tmp, `a${n++}.al`), 8);
    for (let c = 0; c < 8; c++) log.unmark(c);
    const a = log.mark(2, 2);
    const b = log.mark(3, 4);
    assert.equal(a, b);
    assert.equal(log.mark(3, 3), null, 'already marked');
    await a;
    await log.close();
  });

  it('deletes its file when the mirror is removed', async () => {
    const file = path.join(tmp, `a${n++}.al`);
    const { log } = ActivityLog.open(file, 4);
    await log.close(true);
    assert.equal(fs.existsSync(file), false);
  });
});
