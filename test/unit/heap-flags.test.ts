import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, it } from 'node:test';
import { native } from '../../native-bindings';
import { HEAP_FLAGS, missingHeapFlags, REEXEC_MARK, reexecBlocker } from '../../gateway/util/heap-flags';

const fdFlags = (fd: number): string =>
  /flags:\s+(\d+)/.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))![1]!;

describe('heap flags of the gateway process', () => {
  it('adds every heap flag Node was not given', () => {
    assert.deepEqual(missingHeapFlags(['--enable-source-maps']), [...HEAP_FLAGS]);
  });

  it("keeps the operator's value of a flag, in either spelling", () => {
    assert.deepEqual(missingHeapFlags(['--initial-old-space-size=32']), []);
    assert.deepEqual(missingHeapFlags(['--initial_old_space_size=512']), []);
  });

  it('executes itself again only once, and not under the inspector or with an IPC channel', () => {
    assert.equal(reexecBlocker(['--enable-source-maps'], {}, false), null);
    assert.match(reexecBlocker([], { [REEXEC_MARK]: '1' }, false) ?? '', /lost across the re-execution/);
    assert.match(reexecBlocker(['--inspect-brk=0'], {}, false) ?? '', /inspector/);
    assert.match(reexecBlocker([], {}, true) ?? '', /IPC channel/);
  });

  it('does not execute itself again under a CPU profiler, from the command line or NODE_OPTIONS', () => {
    assert.match(reexecBlocker(['--cpu-prof'], {}, false) ?? '', /CPU profiler/);
    assert.match(reexecBlocker(['--prof'], {}, false) ?? '', /CPU profiler/);
    assert.match(
      reexecBlocker([], { NODE_OPTIONS: '--max-old-space-size=512 --cpu-prof' }, false) ?? '',
      /CPU profiler/,
    );
    assert.match(reexecBlocker([], { NODE_OPTIONS: '--inspect' }, false) ?? '', /inspector/);
    assert.equal(reexecBlocker(['--cpu-prof-dir=/tmp'], { NODE_OPTIONS: '' }, false), null);
  });

  it('reports a failed exec as an error with its code, and leaves stdio as it was', () => {
    const before = [0, 1, 2].map(fdFlags);
    assert.throws(
      () => native.reexec('/nonexistent/node', ['/nonexistent/node', '--version']),
      (err: NodeJS.ErrnoException) => err.code === 'ENOENT' && /execv/.test(err.message),
    );
    assert.deepEqual([0, 1, 2].map(fdFlags), before);
  });

  it('hands stdio on to the new program, though libuv opened it close-on-exec', () => {
    const addon = path.resolve(__dirname, '../../native-bindings');
    const r = spawnSync(
      process.execPath,
      [
        '-e',
        `process.stdout.write(''); require(${JSON.stringify(addon)}).native.reexec('/bin/sh', ['sh', '-c', 'echo from sh'])`,
      ],
      { encoding: 'utf8', timeout: 10_000 },
    );
    assert.equal(r.stdout, 'from sh\n', r.stderr);
  });

  it('refuses arguments that are not strings', () => {
    assert.throws(() => native.reexec('/nonexistent', []), TypeError);
    assert.throws(() => native.reexec('/nonexistent', ['/nonexistent', 7 as unknown as string]), TypeError);
  });
});
