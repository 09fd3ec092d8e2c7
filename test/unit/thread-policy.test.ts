// Which threads give up wake-up preemption: the libuv pool's, once they have run a
// native job, and worker threads that ask; never the event loop's own thread.
// Read from /proc (the policy is field 41 of a task's stat; SCHED_BATCH is 3).

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, it } from 'node:test';
import { Worker } from 'node:worker_threads';
import { native } from '../../native-bindings';

const SCHED_OTHER = 0;
const SCHED_BATCH = 3;

/** The scheduling policy of thread `tid` of this process. */
function policyOf(tid: number | 'thread-self'): number {
  const file = tid === 'thread-self' ? '/proc/thread-self/stat' : `/proc/self/task/${tid}/stat`;
  const stat = fs.readFileSync(file, 'utf8');
  // Fields from the third (state) on follow the command name's closing parenthesis.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return Number(fields[41 - 3]);
}

function threadPolicies(): Map<number, number> {
  const out = new Map<number, number>();
  for (const t of fs.readdirSync('/proc/self/task')) out.set(Number(t), policyOf(Number(t)));
  return out;
}

describe('thread scheduling policy', () => {
  it('puts pool threads that ran a native job under SCHED_BATCH, and leaves the event loop alone', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bg-policy-'));
    const fd = fs.openSync(path.join(dir, 'f'), 'w+');
    try {
      // More jobs than threads, at once: several pool threads take one.
      const jobs = Array.from({ length: 16 }, (_, i) =>
        native.ioBatch(fd, true, [Buffer.alloc(4096, i)], [i * 4096]),
      );
      for (const errs of await Promise.all(jobs)) assert.deepEqual([...errs], [0]);
    } finally {
      fs.closeSync(fd);
      fs.rmSync(dir, { recursive: true, force: true });
    }
    const policies = threadPolicies();
    assert.equal(policies.get(process.pid), SCHED_OTHER, 'the event loop thread keeps the default policy');
    assert.ok(
      [...policies.values()].includes(SCHED_BATCH),
      `no thread under SCHED_BATCH: ${JSON.stringify([...policies])}`,
    );
  });

  it('puts a worker thread that asks under SCHED_BATCH', async () => {
    const bindings = require.resolve('../../native-bindings');
    const worker = new Worker(
      `const { parentPort } = require('node:worker_threads');
       const { native } = require(${JSON.stringify(bindings)});
       const took = native.throughputThread();
       const stat = require('node:fs').readFileSync('/proc/thread-self/stat', 'utf8');
       const policy = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[38]);
       parentPort.postMessage({ took, policy });`,
      { eval: true },
    );
    const answer = await new Promise<{ took: boolean; policy: number }>((resolve, reject) => {
      worker.once('message', resolve);
      worker.once('error', reject);
    });
    await worker.terminate();
    assert.deepEqual(answer, { took: true, policy: SCHED_BATCH });
    assert.equal(policyOf('thread-self'), SCHED_OTHER, 'the asking thread alone changed');
  });
});
