// qemu-io (QEMU's NBD client) against the gateway: pattern writes and reads
// at aligned and unaligned places, FUA, write-zeroes with and without unmap,
// discard, flush, asynchronous writes, and the errors a client must see.
// The read/write checks run on a raw and on a memory volume alike.

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Gateway } from '../helpers/gateway';
import { createVolume, KiB, MiB } from '../helpers/fixtures';
import { check, run, RunResult } from '../helpers/run';

const SIZE = 64 * MiB;

/** Runs qemu-io commands on one connection; fails the test unless every command succeeds. */
async function qio(uri: string, ...commands: string[]): Promise<RunResult> {
  const r = await check('qemu-io', ['-f', 'raw', uri, ...commands.flatMap((c) => ['-c', c])], {
    timeoutMs: 30_000,
  });
  assert.doesNotMatch(r.stdout + r.stderr, /failed|error/i);
  return r;
}

/** Runs qemu-io commands expected to fail; returns the result for inspection. */
async function qioFails(args: string[], ...commands: string[]): Promise<RunResult> {
  const r = await run('qemu-io', [...args, ...commands.flatMap((c) => ['-c', c])], { timeoutMs: 30_000 });
  assert.notEqual(r.code, 0, `qemu-io unexpectedly succeeded:\n${r.stdout}${r.stderr}`);
  return r;
}

describe('qemu-io against the gateway', () => {
  let gw: Gateway;

  before(async () => {
    gw = await Gateway.start();
    await createVolume(gw, 'dedup1', '64M', '--backend', 'dedup');
    await createVolume(gw, 'raw1', '64M', '--backend', 'raw');
    await createVolume(gw, 'mem1', '64M', '--backend', 'memory');
    await createVolume(gw, 'frozen', '16M', '--read-only');
  });

  after(async () => {
    await gw?.destroy();
  });

  for (const [backend, volume] of [
    ['dedup', 'dedup1'],
    ['raw', 'raw1'],
    ['memory', 'mem1'],
  ] as const) {
    describe(`on a ${backend} volume`, () => {
      const uri = (): string => gw.uri(volume);

      it('reads back an aligned write on a later connection', async () => {
        await qio(uri(), 'write -P 0xab 0 64k', 'write -P 0xac 1M 1M');
        await qio(uri(), 'read -P 0xab 0 64k', 'read -P 0xac 1M 1M', 'read -P 0 64k 960k');
      });

      it('a pattern check notices data that differs (the checks can fail)', async () => {
        await qio(uri(), 'write -P 0x3c 3M 4k');
        const r = await qioFails(['-f', 'raw', uri()], 'read -P 0x3d 3M 4k');
        assert.match(r.stdout, /Pattern verification failed/);
      });

      it('an unaligned write changes exactly its own bytes', async () => {
        const base = 4 * MiB;
        await qio(uri(), `write -P 0xaa ${base} 16k`, `write -P 0xbb ${base + 1000} 3333`);
        await qio(
          uri(),
          `read -P 0xaa ${base} 1000`,
          `read -P 0xbb ${base + 1000} 3333`,
          `read -P 0xaa ${base + 4333} ${16 * KiB - 4333}`,
        );
      });

      it('writes crossing 4 KiB boundaries read back, neighbours intact', async () => {
        const base = 5 * MiB;
        await qio(
          uri(),
          `write -P 0x11 ${base} 32k`,
          `write -P 0x22 ${base + 4095} 2`, // one byte each side of a boundary
          `write -P 0x33 ${base + 8191} 8194`, // crosses two boundaries, ends unaligned
          `write -P 0x44 ${base + 20000} 1`,
        );
        await qio(
          uri(),
          `read -P 0x11 ${base} 4095`,
          `read -P 0x22 ${base + 4095} 2`,
          `read -P 0x11 ${base + 4097} ${8191 - 4097}`,
          `read -P 0x33 ${base + 8191} 8194`,
          `read -P 0x11 ${base + 16385} ${20000 - 16385}`,
          `read -P 0x44 ${base + 20000} 1`,
          `read -P 0x11 ${base + 20001} ${32 * KiB - 20001}`,
        );
      });

      it('writes at the very end of the export read back', async () => {
        await qio(
          uri(),
          `write -P 0x55 ${SIZE - 64 * KiB} 64k`,
          `write -P 0x66 ${SIZE - 3333} 3333`,
          `write -P 0x77 ${SIZE - 1} 1`,
        );
        await qio(
          uri(),
          `read -P 0x55 ${SIZE - 64 * KiB} ${64 * KiB - 3333}`,
          `read -P 0x66 ${SIZE - 3333} 3332`,
          `read -P 0x77 ${SIZE - 1} 1`,
        );
      });

      it('a write with FUA is acknowledged and reads back', async () => {
        const r = await qio(uri(), 'write -f -P 0x5f 6M 64k', 'write -f -P 0x60 7340033 1000');
        assert.match(r.stdout, /wrote 65536\/65536 bytes at offset 6291456/);
        await qio(uri(), 'read -P 0x5f 6M 64k', 'read -P 0x60 7340033 1000', 'read -P 0 7341033 100');
      });

      it('write zeroes (-z) clears a written range and only that range', async () => {
        const base = 8 * MiB;
        await qio(
          uri(),
          `write -P 0x99 ${base} 256k`,
          `write -z ${base + 64 * KiB} 64k`,
          `write -z ${base + 200_000} 5000`, // unaligned both ends
        );
        await qio(
          uri(),
          `read -P 0x99 ${base} 64k`,
          `read -P 0 ${base + 64 * KiB} 64k`,
          `read -P 0x99 ${base + 128 * KiB} ${200_000 - 128 * KiB}`,
          `read -P 0 ${base + 200_000} 5000`,
          `read -P 0x99 ${base + 205_000} ${256 * KiB - 205_000}`,
        );
      });

      it('write zeroes that may unmap (-z -u) clears a written range and only that range', async () => {
        const base = 9 * MiB;
        await qio(
          uri(),
          `write -P 0x98 ${base} 2M`,
          `write -z -u ${base + 512 * KiB} 1M`,
          `write -z -u ${base + 1_700_001} 77777`,
        );
        await qio(
          uri(),
          `read -P 0x98 ${base} 512k`,
          `read -P 0 ${base + 512 * KiB} 1M`,
          `read -P 0x98 ${base + 1536 * KiB} ${1_700_001 - 1536 * KiB}`,
          `read -P 0 ${base + 1_700_001} 77777`,
          `read -P 0x98 ${base + 1_777_778} ${2 * MiB - 1_777_778}`,
        );
      });

      it('a discarded range reads back as zeros', async () => {
        const base = 12 * MiB;
        await qio(uri(), `write -P 0x97 ${base} 3M`, `discard ${base + 1 * MiB} 1M`);
        await qio(
          uri(),
          `read -P 0x97 ${base} 1M`,
          `read -P 0 ${base + 1 * MiB} 1M`,
          `read -P 0x97 ${base + 2 * MiB} 1M`,
        );
      });

      it('a flush after writes succeeds and the data reads back', async () => {
        const r = await qio(uri(), 'write -P 0x96 16M 128k', 'flush', 'write -P 0x95 17M 4k', 'flush');
        assert.doesNotMatch(r.stderr, /flush/i);
        await qio(uri(), 'read -P 0x96 16M 128k', 'read -P 0x95 17M 4k');
      });

      it('asynchronous writes complete with aio_flush and read back', async () => {
        const writes = Array.from(
          { length: 8 },
          (_, i) => `aio_write -P 0x${(0x80 + i).toString(16)} ${20 * MiB + i * 100_000} 70000`,
        );
        const r = await qio(uri(), ...writes, 'aio_flush');
        assert.equal((r.stdout.match(/wrote 70000\/70000 bytes/g) ?? []).length, 8, r.stdout);
        await qio(
          uri(),
          ...Array.from(
            { length: 8 },
            (_, i) => `read -P 0x${(0x80 + i).toString(16)} ${20 * MiB + i * 100_000} 70000`,
          ),
          ...Array.from({ length: 8 }, (_, i) => `read -P 0 ${20 * MiB + i * 100_000 + 70000} 30000`),
        );
      });

      // QEMU's block layer refuses these before they reach the wire (it knows the
      // export size); the server's own ENOSPC answer is covered by nbd-bad-input.
      it('a write past the end fails and changes nothing', async () => {
        await qio(uri(), `write -P 0x12 ${SIZE - 4 * KiB} 4k`);
        const straddle = await qioFails(['-f', 'raw', uri()], `write -P 0x13 ${SIZE - 2 * KiB} 4k`);
        assert.match(straddle.stdout + straddle.stderr, /write failed/);
        const beyond = await qioFails(['-f', 'raw', uri()], `write -P 0x13 ${SIZE} 4k`);
        assert.match(beyond.stdout + beyond.stderr, /write failed/);
        await qio(uri(), `read -P 0x12 ${SIZE - 4 * KiB} 4k`);
      });
    });
  }

  // QEMU honours the READ_ONLY flag itself: opening read-write fails, and a
  // read-only open refuses writes locally. (EPERM on the wire: nbd-bad-input.)
  describe('on a read-only volume', () => {
    it('refuses to open it for writing', async () => {
      const r = await qioFails(['-f', 'raw', gw.uri('frozen')], 'write -P 0x1 0 4k');
      assert.match(r.stderr, /Permission denied|read-only/i);
    });

    it('refuses writes, zeroes and discards when opened read-only, and still reads zeros', async () => {
      const ro = ['-r', '-f', 'raw', gw.uri('frozen')];
      for (const cmd of ['write -P 0x1 0 4k', 'write -z 0 4k', 'discard 0 4k']) {
        const r = await qioFails(ro, cmd);
        assert.match(r.stdout + r.stderr, /failed|read-only|Permission denied/i, cmd);
      }
      const r = await check('qemu-io', [...ro, '-c', 'read -P 0 0 64k', '-c', 'read -P 0 16320k 64k'], {
        timeoutMs: 30_000,
      });
      assert.match(r.stdout, /read 65536\/65536 bytes at offset 16711680/);
    });
  });
});
