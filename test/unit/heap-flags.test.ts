import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { describe, it } from 'node:test';
import { native } from '../../native-bindings';
import { HEAP_FLAGS, missingHeapFlags } from '../../gateway/util/heap-flags';

describe('heap flags of the gateway process', () => {
  it('adds every heap flag Node was not given', () => {
    assert.deepEqual(missingHeapFlags(['--enable-source-maps']), [...HEAP_FLAGS]);
  });

  it("keeps the operator's value of a flag, in either spelling", () => {
    assert.deepEqual(missingHeapFlags(['--initial-old-space-size=32']), []);
    assert.deepEqual(missingHeapFlags(['--initial_old_space_size=512']), []);
  });

  it('reports a failed exec as an error with its code, and the process goes on', () => {
    assert.throws(
      () => native.reexec('/nonexistent/node', ['/nonexistent/node', '--version']),
      (err: NodeJS.ErrnoException) => err.code === 'ENOENT' && /execv/.test(err.message),
    );
  });

  it('hands stdio on to the new program, open and blocking', () => {
    const addon = path.resolve(__dirname, '../../native-bindings');
    const r = spawnSync(
      process.execPath,
      [
        '-e',
        `require(${JSON.stringify(addon)}).native.reexec('/bin/sh', ['sh', '-c', 'grep flags /proc/self/fdinfo/1'])`,
      ],
      { encoding: 'utf8', timeout: 10_000 },
    );
    const flags = /flags:\s+([0-7]+)/.exec(r.stdout);
    assert.ok(flags, `the new program's stdout: ${JSON.stringify(r.stdout)} ${r.stderr}`);
    assert.equal(parseInt(flags[1]!, 8) & 0o4000, 0, 'O_NONBLOCK cleared');
  });

  it('refuses arguments that are not strings', () => {
    assert.throws(() => native.reexec(process.execPath, []), TypeError);
    assert.throws(
      () => native.reexec(process.execPath, [process.execPath, 7 as unknown as string]),
      TypeError,
    );
  });
});
