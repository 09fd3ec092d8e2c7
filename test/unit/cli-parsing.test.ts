import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { parseArgs } from '../../gateway/cli/args';
import { parseListenAddress } from '../../gateway/nbd/listen-address';
import { formatSize, parseSize } from '../../gateway/util/size';

describe('sizes', () => {
  it('takes binary suffixes', () => {
    assert.equal(parseSize('512'), 512);
    assert.equal(parseSize('64K'), 65536);
    assert.equal(parseSize('10M'), 10 * 2 ** 20);
    assert.equal(parseSize('8G'), 8 * 2 ** 30);
    assert.equal(parseSize('1T'), 2 ** 40);
    assert.equal(parseSize('2GiB'), 2 * 2 ** 30);
  });

  it('refuses a size with an unknown suffix', () => {
    assert.throws(() => parseSize('10Q'), { code: 'ERR_INVALID_ARGUMENT', message: /invalid size '10Q'/ });
    assert.throws(() => parseSize('-1'), { code: 'ERR_INVALID_ARGUMENT' });
    assert.throws(() => parseSize(''), { code: 'ERR_INVALID_ARGUMENT' });
  });

  it('prints sizes in binary units', () => {
    assert.equal(formatSize(8 * 2 ** 30), '8 GiB');
    assert.equal(formatSize(1536), '1.5 KiB');
    assert.equal(formatSize(100), '100 B');
  });
});

describe('listen addresses', () => {
  it('parses TCP, IPv6 and Unix forms', () => {
    assert.deepEqual(parseListenAddress('127.0.0.1:10809'), { kind: 'tcp', host: '127.0.0.1', port: 10809 });
    assert.deepEqual(parseListenAddress('[::1]:0'), { kind: 'tcp', host: '::1', port: 0 });
    assert.deepEqual(parseListenAddress('unix:/tmp/s'), { kind: 'unix', path: '/tmp/s' });
  });

  it('refuses an address without a port', () => {
    assert.throws(() => parseListenAddress('localhost'), /not HOST:PORT/);
    assert.throws(() => parseListenAddress('h:99999'), /out of range/);
  });
});

describe('argument parsing', () => {
  const spec = { flags: ['json'], values: ['size'], repeatable: ['listen'] };

  it('accepts options anywhere, with = or a separate value', () => {
    const p = parseArgs(
      ['volume', '--size=1G', 'create', 'v', '--json', '--listen', 'a', '--listen', 'b'],
      spec,
    );
    assert.deepEqual(p.positionals, ['volume', 'create', 'v']);
    assert.equal(p.values.get('size'), '1G');
    assert.ok(p.flags.has('json'));
    assert.deepEqual(p.repeated.get('listen'), ['a', 'b']);
  });

  it('refuses unknown options and missing values', () => {
    assert.throws(() => parseArgs(['--bogus'], spec), /unknown option --bogus/);
    assert.throws(() => parseArgs(['--size'], spec), /--size needs a value/);
    assert.throws(() => parseArgs(['--json=1'], spec), /takes no value/);
  });
});
