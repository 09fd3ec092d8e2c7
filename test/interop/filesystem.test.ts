// An ext4 filesystem on a volume, through a real FUSE export: qemu-storage-
// daemon connects to the gateway as an NBD client and exposes the volume as a
// regular file, on which mkfs.ext4, debugfs and e2fsck work as on a disk.
// The filesystem must survive a clean gateway restart bit for bit.

import assert from 'node:assert/strict';
import { ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Gateway } from '../helpers/gateway';
import { createVolume, KiB, MiB, scratchDir, writeRandomFile } from '../helpers/fixtures';
import { check, run } from '../helpers/run';

const SBIN = '/usr/sbin';
const VOLUME = 'fs0';
const VOLUME_SIZE = 64 * MiB;
const FILES: Record<string, number> = {
  'tiny.bin': 3 * KiB,
  'odd.bin': 100 * KiB + 17,
  'one-mib.bin': MiB,
  'big.bin': 3 * MiB + 123,
  'empty.bin': 0,
};

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function isMounted(file: string): boolean {
  return fs
    .readFileSync('/proc/mounts', 'utf8')
    .split('\n')
    .some((line) => line.split(' ')[1] === file);
}

/** qemu-storage-daemon exporting a volume as a FUSE file. */
class FuseExport {
  private stderr = '';
  private readonly closed: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;

  private constructor(
    readonly file: string,
    private readonly proc: ChildProcess,
  ) {
    proc.stderr!.on('data', (c: Buffer) => (this.stderr += c.toString()));
    proc.stdout!.on('data', (c: Buffer) => (this.stderr += c.toString()));
    this.closed = new Promise((resolve) => proc.on('close', (code, signal) => resolve({ code, signal })));
  }

  /** Starts the export and waits (bounded) until the file shows the volume's size. */
  static async start(gw: Gateway, name: string, file: string, size: number): Promise<FuseExport> {
    fs.closeSync(fs.openSync(file, 'a')); // the mountpoint must exist
    const proc = spawn(
      'qemu-storage-daemon',
      [
        '--blockdev',
        `driver=nbd,node-name=n0,server.type=unix,server.path=${gw.socket},export=${name}`,
        '--export',
        `type=fuse,id=e0,node-name=n0,mountpoint=${file},writable=on`,
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    const fx = new FuseExport(file, proc);
    const deadline = Date.now() + 15_000;
    for (let i = 0; i < 300 && Date.now() < deadline; i++) {
      if (proc.exitCode !== null || proc.signalCode !== null) break;
      if (isMounted(file) && fs.statSync(file).size === size) return fx;
      await sleep(50);
    }
    await fx.stop();
    throw new Error(`FUSE export of ${name} did not come up at ${file}:\n${fx.stderr}`);
  }

  get log(): string {
    return this.stderr;
  }

  /** SIGTERM, wait (bounded) for exit, then make sure the mount is gone. */
  async stop(): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill('SIGTERM');
    const timer = setTimeout(() => this.proc.kill('SIGKILL'), 15_000);
    const status = await this.closed;
    clearTimeout(timer);
    if (isMounted(this.file)) await run('fusermount3', ['-u', '-z', this.file], { timeoutMs: 10_000 });
    return status;
  }
}

describe('an ext4 filesystem on a volume through a FUSE export', () => {
  let gw: Gateway;
  let dir: string;
  let image: string;
  let fx: FuseExport | undefined;

  before(async () => {
    dir = scratchDir('fs');
    image = path.join(dir, 'volume.img');
    for (const [name, size] of Object.entries(FILES)) writeRandomFile(path.join(dir, name), size);
    gw = await Gateway.start();
    await createVolume(gw, VOLUME, '64M');
  });

  after(async () => {
    await fx?.stop();
    await gw?.destroy();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  /** Dumps every file out of the filesystem and compares it with the original. */
  async function assertFilesReadBack(tag: string): Promise<void> {
    for (const name of Object.keys(FILES)) {
      const out = path.join(dir, `${tag}-${name}`);
      await check(`${SBIN}/debugfs`, ['-R', `dump /${name} ${out}`, image], { timeoutMs: 30_000 });
      assert.ok(fs.existsSync(out), `debugfs did not dump ${name}`);
      assert.ok(
        fs.readFileSync(out).equals(fs.readFileSync(path.join(dir, name))),
        `${name} differs (${tag})`,
      );
    }
  }

  it('formats the volume with mkfs.ext4 and writes files with debugfs', { timeout: 120_000 }, async () => {
    fx = await FuseExport.start(gw, VOLUME, image, VOLUME_SIZE);
    await check(`${SBIN}/mkfs.ext4`, ['-F', '-q', image], { timeoutMs: 60_000 });
    for (const name of Object.keys(FILES)) {
      await check(`${SBIN}/debugfs`, ['-w', '-R', `write ${path.join(dir, name)} ${name}`, image], {
        timeoutMs: 60_000,
      });
    }
    const ls = await check(`${SBIN}/debugfs`, ['-R', 'ls -l /', image], { timeoutMs: 30_000 });
    for (const [name, size] of Object.entries(FILES)) {
      assert.match(ls.stdout, new RegExp(`\\s${size} .*\\s${name.replace('.', '\\.')}\\s*$`, 'm'), ls.stdout);
    }
    await assertFilesReadBack('before');
    const fsck = await run(`${SBIN}/e2fsck`, ['-fn', image], { timeoutMs: 60_000 });
    assert.equal(fsck.code, 0, fsck.stdout + fsck.stderr);
  });

  it('releases the export and stops the gateway cleanly with SIGTERM', { timeout: 60_000 }, async () => {
    assert.ok(fx, 'no FUSE export from the previous step');
    const qsd = await fx.stop();
    fx = undefined;
    assert.deepEqual(qsd, { code: 0, signal: null }, 'qemu-storage-daemon did not exit cleanly');
    assert.equal(isMounted(image), false, 'FUSE mount still present');
    assert.deepEqual(await gw.stop('SIGTERM'), { code: 0, signal: null }, gw.log);
    assert.match(gw.log, /stopped cleanly/);
  });

  it(
    'after a restart the filesystem checks clean and every file reads back identical',
    { timeout: 120_000 },
    async () => {
      gw = await Gateway.start({ dataDir: gw.dataDir });
      fx = await FuseExport.start(gw, VOLUME, image, VOLUME_SIZE);
      const fsck = await run(`${SBIN}/e2fsck`, ['-fn', image], { timeoutMs: 60_000 });
      assert.equal(fsck.code, 0, fsck.stdout + fsck.stderr);
      assert.match(fsck.stdout, new RegExp(`${Object.keys(FILES).length + 11}/\\d+ files`));
      await assertFilesReadBack('after');
    },
  );
});
