// Mirrored volumes between real gateway processes on loopback: `replica add`
// syncs what the volume holds (hash-first: blocks the replica already has
// never travel), later writes follow, and qemu-img compare finds the two
// exports identical. A sync replica that dies does not stop the primary, and
// catches up when it returns.

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Gateway } from '../helpers/gateway';
import { createVolume, MiB, scratchDir, writeRandomFile } from '../helpers/fixtures';
import { check, run } from '../helpers/run';
import { openIndex } from '../../gateway/store/index-db';
import { dataPageKeyInto, entryOffset } from '../../gateway/store/data-pages';
import { decodeDataEntryAt, RECORD_HEADER, segmentFileName } from '../../gateway/store/layout';
import { metaEntry, setMetaEntry } from '../helpers/metamap';
import { TcpProxy } from '../helpers/tcp-proxy';
import { RawClient } from '../helpers/raw-client';

const dir = scratchDir('blockgate-mirror-');
const keyFile = path.join(dir, 'cluster.key');

interface ReplicaList {
  role: string;
  primary: string | null;
  replicas: Array<{
    to: string;
    mode: string;
    state: string;
    lagBytes: number;
    heldWriters: number;
    sentBytes: number;
    lastError: string | null;
  }>;
}

async function replicaList(gw: Gateway, volume: string): Promise<ReplicaList> {
  const r = await gw.cli('replica', 'list', volume, '--json');
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout) as ReplicaList;
}

/** Polls `replica list` until the replica reaches `state` (and, with `durable`, has no lag) (bounded: 30 s). */
async function waitForState(
  gw: Gateway,
  volume: string,
  state: string,
  durable = false,
): Promise<ReplicaList> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const l = await replicaList(gw, volume);
    if (l.replicas.every((r) => r.state === state && (!durable || r.lagBytes === 0))) return l;
    if (Date.now() > deadline)
      throw new Error(`replicas of ${volume} never reached ${state}: ${JSON.stringify(l)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Seconds qemu-io reports for its operations ("00.01 sec" or "0:00:02.31"). */
function opSeconds(out: string): number {
  const short = /ops; (\d+\.\d+) sec/.exec(out);
  if (short) return Number(short[1]);
  const long = /ops; (\d+):(\d+):(\d+\.\d+)/.exec(out);
  assert.ok(long, `no timing in qemu-io output: ${out}`);
  return Number(long[1]) * 3600 + Number(long[2]) * 60 + Number(long[3]);
}

function replicationPort(gw: Gateway): number {
  return Number(/replication: gateway [0-9a-f]{32} listening on 127\.0\.0\.1:(\d+)/.exec(gw.log)![1]);
}

async function identical(a: string, b: string): Promise<void> {
  const r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a, b], { timeoutMs: 60_000 });
  assert.equal(r.code, 0, `qemu-img compare: ${r.stdout}${r.stderr}`);
}

function startPair(): Promise<[Gateway, Gateway]> {
  const args = ['--cluster-key', keyFile];
  return Promise.all([
    Gateway.start({ args: [...args, '--mirror-timeout', '2'] }),
    Gateway.start({ args: [...args, '--replication-listen', '127.0.0.1:0'] }),
  ]);
}

describe('mirrored volumes', () => {
  let primary: Gateway;
  let replica: Gateway;
  let to: string;

  before(async () => {
    fs.writeFileSync(keyFile, crypto.randomBytes(32), { mode: 0o600 });
    [primary, replica] = await startPair();
    to = `127.0.0.1:${replicationPort(replica)}`;
  });
  after(async () => {
    await primary?.destroy();
    await replica?.destroy();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  /** A new volume mirrored to the replica, written with qemu-io `commands`, once in sync. */
  async function mirroredVolume(name: string, size: string, commands: string[]): Promise<void> {
    await createVolume(primary, name, size);
    assert.equal((await primary.cli('replica', 'add', name, '--to', to)).code, 0);
    await check('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), primary.uri(name)]);
    await waitForState(primary, name, 'in-sync', true);
  }

  /**
   * Behind the replica gateway's back (stopped, its index edited, started again): block `lba`
   * of its copy of `volume` maps to block `like`'s content.
   */
  async function remapOnReplica(volume: string, lba: number, like: number): Promise<void> {
    const replicaDir = replica.dataDir;
    const port = replicationPort(replica);
    await replica.stop();
    const { env, meta, state } = openIndex(path.join(replicaDir, 'store'));
    const vid = (state.get('store') as { volumes: Record<string, number> }).volumes[volume]!;
    await setMetaEntry(meta!, vid, lba, metaEntry(meta!, vid, like));
    await env.close();
    replica = await Gateway.start({
      dataDir: replicaDir,
      args: ['--cluster-key', keyFile, '--replication-listen', `127.0.0.1:${port}`],
    });
  }

  it('syncs a volume that holds data and mirrors later writes (async)', async () => {
    await createVolume(primary, 'a1', '64M');
    await check('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0x5a 0 6M',
      '-c',
      'write -P 0x11 20M 1M',
      primary.uri('a1'),
    ]);
    const add = await primary.cli('replica', 'add', 'a1', '--to', to);
    assert.equal(add.code, 0, add.stderr);
    await waitForState(primary, 'a1', 'in-sync');
    await check('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0x77 3M 2M',
      '-c',
      'write -z 21M 64k',
      primary.uri('a1'),
    ]);
    await check('qemu-io', ['-f', 'raw', '-c', 'discard 0 1M', primary.uri('a1')]);
    await waitForState(primary, 'a1', 'in-sync');
    await identical(primary.uri('a1'), replica.uri('a1'));
  });

  it('acknowledges sync writes only once the replica has them', async () => {
    await createVolume(primary, 's1', '32M');
    assert.equal((await primary.cli('replica', 'add', 's1', '--to', to, '--mode', 'sync')).code, 0);
    await waitForState(primary, 's1', 'in-sync');
    const data = path.join(dir, 's1.bin');
    writeRandomFile(data, 8 * MiB);
    await check('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', data, primary.uri('s1')]);
    // No waiting: every write qemu-img had acknowledged is on the replica already.
    await identical(primary.uri('s1'), replica.uri('s1'));
  });

  it('holds a sync write until the replica answers, then drops it to behind after the timeout', async () => {
    await createVolume(primary, 'p1', '16M');
    assert.equal((await primary.cli('replica', 'add', 'p1', '--to', to, '--mode', 'sync')).code, 0);
    await waitForState(primary, 'p1', 'in-sync');
    replica.proc.kill('SIGSTOP');
    try {
      // cache=unsafe, and qemu-io's own timing of the write: what its exit does is not measured.
      const r = await check(
        'qemu-io',
        ['-f', 'raw', '-t', 'unsafe', '-c', 'write -P 0x3c 0 4k', primary.uri('p1')],
        { timeoutMs: 30_000 },
      );
      const held = opSeconds(r.stdout);
      // The 2 s --mirror-timeout: an async replica, or a sync one that does not wait, answers in far less.
      assert.ok(held >= 1.5, `the write was acknowledged after ${held} s, without the replica`);
      assert.equal((await replicaList(primary, 'p1')).replicas[0]!.state !== 'in-sync', true);
    } finally {
      replica.proc.kill('SIGCONT');
    }
    await waitForState(primary, 'p1', 'in-sync');
    await identical(primary.uri('p1'), replica.uri('p1'));
  });

  it('sends only the ids of blocks the replica already holds under another volume', async () => {
    const data = path.join(dir, 'shared.bin');
    writeRandomFile(data, 8 * MiB);
    await createVolume(replica, 'local', '16M');
    await check('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', data, replica.uri('local')]);
    await createVolume(primary, 'h1', '16M');
    await check('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', data, primary.uri('h1')]);
    assert.equal((await primary.cli('replica', 'add', 'h1', '--to', to)).code, 0);
    const l = await waitForState(primary, 'h1', 'in-sync');
    await identical(primary.uri('h1'), replica.uri('h1'));
    const sent = l.replicas[0]!.sentBytes;
    // 2048 random blocks: 16 bytes of id each, not 4 KiB.
    assert.ok(sent < 0.05 * 8 * MiB, `sent ${sent} bytes for 8 MiB the replica already held`);
  });

  it('serves the replica read-only and reports its primary', async () => {
    const r = await run('qemu-io', ['-f', 'raw', '-c', 'write 0 4k', replica.uri('a1')]);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr + r.stdout, /Permission denied|Operation not permitted/);
    const l = await replicaList(replica, 'a1');
    assert.equal(l.role, 'replica');
    assert.match(l.primary ?? '', /^[0-9a-f]{32}$/);
  });

  it('refuses a second replica add to the same gateway and a mirror of a raw volume', async () => {
    const again = await primary.cli('replica', 'add', 'a1', '--to', to);
    assert.equal(again.code, 1);
    assert.match(again.stderr, /already mirrored/);
    await createVolume(primary, 'r1', '16M', '--backend', 'raw');
    const raw = await primary.cli('replica', 'add', 'r1', '--to', to);
    assert.equal(raw.code, 1);
    assert.match(raw.stderr, /only dedup volumes are mirrored/);
    const usage = await primary.cli('replica', 'add', 'a1');
    assert.equal(usage.code, 2);
    assert.match(usage.stderr, /needs --to/);
  });

  it('goes on writing when a sync replica dies, and resyncs it when it returns', async () => {
    await createVolume(primary, 'k1', '32M');
    assert.equal((await primary.cli('replica', 'add', 'k1', '--to', to, '--mode', 'sync')).code, 0);
    await waitForState(primary, 'k1', 'in-sync');
    await check('qemu-io', ['-f', 'raw', '-c', 'write -P 0x21 0 4M', primary.uri('k1')]);
    const replicaDir = replica.dataDir;
    const port = replicationPort(replica);
    await replica.kill();
    // Bounded by the 2 s mirror timeout: the write is acknowledged without the replica.
    await check('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 1M 2M', '-c', 'flush', primary.uri('k1')], {
      timeoutMs: 20_000,
    });
    const behind = await replicaList(primary, 'k1');
    assert.notEqual(behind.replicas[0]!.state, 'in-sync');
    replica = await Gateway.start({
      dataDir: replicaDir,
      args: ['--cluster-key', keyFile, '--replication-listen', `127.0.0.1:${port}`],
    });
    await waitForState(primary, 'k1', 'in-sync');
    await identical(primary.uri('k1'), replica.uri('k1'));
  });

  it('sends again what a replica acknowledged but lost in a crash before making it durable', async () => {
    await createVolume(primary, 'c1', '16M');
    assert.equal((await primary.cli('replica', 'add', 'c1', '--to', to, '--mode', 'sync')).code, 0);
    await waitForState(primary, 'c1', 'in-sync', true);
    // A sync write is acknowledged once applied on the replica; without a FLUSH (fio's nbd
    // engine sends none) it is not durable there until the next durable point, and the kill
    // comes first.
    await check('fio', [
      '--name=c1',
      '--ioengine=nbd',
      `--uri=${primary.uri('c1')}`,
      '--rw=write',
      '--bs=1M',
      '--size=2M',
      '--buffer_pattern=0x6d',
    ]);
    const replicaDir = replica.dataDir;
    const port = replicationPort(replica);
    await replica.kill();
    replica = await Gateway.start({
      dataDir: replicaDir,
      args: ['--cluster-key', keyFile, '--replication-listen', `127.0.0.1:${port}`],
    });
    await waitForState(primary, 'c1', 'in-sync', true);
    await identical(primary.uri('c1'), replica.uri('c1'));
  });

  it('verify finds a block of the replica changed behind its gateway, and only that one', async () => {
    await mirroredVolume('v1', '16M', ['write -P 0x51 0 1M', 'write -P 0x52 1M 1M']);
    const same = await primary.cli('verify', 'v1');
    assert.equal(same.code, 0, same.stdout + same.stderr);
    assert.match(same.stdout, /same content/);

    // Behind the replica gateway's back: block 300 of its copy now maps to block 0's content.
    await remapOnReplica('v1', 300, 0);
    await waitForState(primary, 'v1', 'in-sync', true);
    const differs = await primary.cli('verify', 'v1', '--json');
    assert.equal(differs.code, 1, differs.stderr);
    const report = JSON.parse(differs.stdout) as { replicas: Array<{ mismatched: unknown[] }> };
    assert.deepEqual(report.replicas[0]!.mismatched, [{ offset: 300 * 4096, length: 4096 }]);
  });

  /**
   * Behind a gateway's back (stopped, a byte of a segment file changed, started again with
   * `args`): the stored bytes of block `lba` of its copy of `volume` are damaged.
   */
  async function damageBlock(gw: Gateway, args: string[], volume: string, lba: number): Promise<Gateway> {
    const dataDir = gw.dataDir;
    await gw.stop();
    const storeDir = path.join(dataDir, 'store');
    const { env, meta, data, state } = openIndex(storeDir);
    const vid = (state.get('store') as { volumes: Record<string, number> }).volumes[volume]!;
    const id = metaEntry(meta!, vid, lba)!;
    const page = data!.getBinary(dataPageKeyInto(id, Buffer.alloc(8)))!;
    const entry = decodeDataEntryAt(page, entryOffset(page, id));
    await env.close();
    const fd = fs.openSync(path.join(storeDir, 'segments', segmentFileName(entry.segment)), 'r+');
    const at = entry.offset + RECORD_HEADER + Math.floor(entry.storedLength / 2);
    const byte = Buffer.alloc(1);
    fs.readSync(fd, byte, 0, 1, at);
    fs.writeSync(fd, Buffer.of(byte[0]! ^ 0x5a), 0, 1, at);
    fs.closeSync(fd);
    return Gateway.start({ dataDir, args });
  }

  async function damageOnReplica(volume: string, lba: number): Promise<void> {
    const args = ['--cluster-key', keyFile, '--replication-listen', `127.0.0.1:${replicationPort(replica)}`];
    replica = await damageBlock(replica, args, volume, lba);
  }

  interface DataReport {
    damaged: Array<{ offset: number; length: number }>;
    mended: Array<{ offset: number; length: number }>;
    replicas: Array<{ mismatched: unknown[]; damaged: Array<{ offset: number; length: number }> }>;
  }

  it('verify --scrub finds a replica block damaged on disk, which content ids cannot, and the resync mends it, for its snapshot too', async () => {
    await mirroredVolume('d1', '16M', ['write -P 0x3d 0 4k', 'write -P 0x3e 4k 4k', 'write -P 0x3f 8k 4k']);
    assert.equal((await primary.cli('snapshot', 'create', 'd1', 's')).code, 0);
    await replica.waitForLog(/volume d1: snapshot s taken as on gateway/, 10_000);
    await damageOnReplica('d1', 1);
    await waitForState(primary, 'd1', 'in-sync', true);
    // The metamaps still agree: only reading the bytes back tells.
    assert.equal((await primary.cli('verify', 'd1')).code, 0);

    const found = await primary.cli('verify', 'd1', '--scrub', '--json');
    assert.equal(found.code, 1, found.stderr);
    const report = JSON.parse(found.stdout) as DataReport;
    assert.deepEqual(report.damaged, []);
    assert.deepEqual(report.replicas[0]!.mismatched, []);
    assert.deepEqual(report.replicas[0]!.damaged, [{ offset: 4096, length: 4096 }]);

    // Sent again, with its bytes (the replica no longer offers the damaged copy); the damaged
    // copy, which the snapshot shares, is written again from the new one.
    await waitForState(primary, 'd1', 'in-sync', true);
    await replica.waitForLog(/its damaged copy mended from a new record of its content/, 10_000);
    await identical(primary.uri('d1'), replica.uri('d1'));
    await identical(primary.uri('d1@s'), replica.uri('d1@s'));
    const clean = await primary.cli('verify', 'd1', '--scrub');
    assert.equal(clean.code, 0, clean.stdout + clean.stderr);
    assert.match(clean.stdout, /every block reads back as its content id/);
  });

  it("verify --scrub mends a block damaged in the primary's own copy from the replica", async () => {
    await mirroredVolume('d2', '16M', ['write -P 0x4d 0 4k', 'write -P 0x4e 4k 4k']);
    primary = await damageBlock(primary, ['--cluster-key', keyFile, '--mirror-timeout', '2'], 'd2', 1);
    await waitForState(primary, 'd2', 'in-sync', true);
    await assert.rejects(
      check('qemu-io', ['-f', 'raw', '-c', 'read -P 0x4e 4k 4k', primary.uri('d2')]),
      /Input\/output error/,
    );

    const found = await primary.cli('verify', 'd2', '--scrub', '--json');
    assert.equal(found.code, 1, found.stderr);
    const report = JSON.parse(found.stdout) as DataReport;
    assert.deepEqual(report.damaged, [{ offset: 4096, length: 4096 }]);
    assert.deepEqual(report.mended, [{ offset: 4096, length: 4096 }]);
    assert.deepEqual(report.replicas[0]!.damaged, []);

    const read = await check('qemu-io', ['-f', 'raw', '-c', 'read -P 0x4e 4k 4k', primary.uri('d2')]);
    assert.doesNotMatch(read.stdout, /Pattern verification failed/);
    await identical(primary.uri('d2'), replica.uri('d2'));
    assert.equal((await primary.cli('verify', 'd2', '--scrub')).code, 0);
  });

  it('verify compares a volume larger than one request a slice at a time, and finds a block in the last', async () => {
    // 17 GiB, thin: chunks 0-4095 go in the first request, 4096-4351 in the second.
    const lba = 4200 * 1024 + 5;
    await mirroredVolume('big', '17G', ['write -P 0x61 0 4k', `write -P 0x62 ${lba * 4096} 4k`]);
    const same = await primary.cli('verify', 'big', '--json');
    assert.equal(same.code, 0, same.stdout + same.stderr);
    assert.equal(
      (JSON.parse(same.stdout) as { replicas: Array<{ chunks: number }> }).replicas[0]!.chunks,
      4352,
    );

    // Behind the replica gateway's back: the block in the second slice maps to block 0's content.
    await remapOnReplica('big', lba, 0);
    await waitForState(primary, 'big', 'in-sync', true);
    const differs = await primary.cli('verify', 'big', '--json');
    assert.equal(differs.code, 1, differs.stderr);
    const report = JSON.parse(differs.stdout) as { replicas: Array<{ mismatched: unknown[] }> };
    assert.deepEqual(report.replicas[0]!.mismatched, [{ offset: lba * 4096, length: 4096 }]);
  });

  it('survives a link that stalls and one that is cut, losing nothing acknowledged', async () => {
    const proxy = await TcpProxy.start({ host: '127.0.0.1', port: replicationPort(replica) });
    try {
      await createVolume(primary, 'n1', '16M');
      const add = await primary.cli(
        'replica',
        'add',
        'n1',
        '--to',
        `127.0.0.1:${proxy.port}`,
        '--mode',
        'sync',
      );
      assert.equal(add.code, 0, add.stderr);
      await waitForState(primary, 'n1', 'in-sync', true);

      // Stalled: a sync write waits out the 2 s timeout, the replica drops to behind, writes go on.
      proxy.stall();
      await check('qemu-io', ['-f', 'raw', '-c', 'write -P 0x71 0 1M', primary.uri('n1')], {
        timeoutMs: 30_000,
      });
      await check('qemu-io', ['-f', 'raw', '-c', 'write -P 0x72 1M 1M', primary.uri('n1')], {
        timeoutMs: 30_000,
      });
      assert.notEqual((await replicaList(primary, 'n1')).replicas[0]!.state, 'in-sync');
      proxy.resume();
      await waitForState(primary, 'n1', 'in-sync', true);
      await identical(primary.uri('n1'), replica.uri('n1'));

      // Cut: the mirror reconnects and sends what the replica missed.
      proxy.cut();
      await check('qemu-io', ['-f', 'raw', '-c', 'write -P 0x73 2M 1M', primary.uri('n1')], {
        timeoutMs: 30_000,
      });
      proxy.cut();
      await waitForState(primary, 'n1', 'in-sync', true);
      await identical(primary.uri('n1'), replica.uri('n1'));
      assert.match(replica.log, /link from gateway [0-9a-f]+ at .* closed/);
    } finally {
      await primary.cli('replica', 'remove', 'n1', `127.0.0.1:${proxy.port}`);
      await proxy.close();
    }
  });

  it('makes async writers wait once the replica trails by --mirror-buffer, then drops it to behind', async () => {
    const small = await Gateway.start({
      args: ['--cluster-key', keyFile, '--mirror-timeout', '6', '--mirror-buffer', '256K'],
    });
    const proxy = await TcpProxy.start({ host: '127.0.0.1', port: replicationPort(replica) });
    try {
      await createVolume(small, 'b1', '16M');
      const add = await small.cli('replica', 'add', 'b1', '--to', `127.0.0.1:${proxy.port}`);
      assert.equal(add.code, 0, add.stderr);
      await waitForState(small, 'b1', 'in-sync', true);

      proxy.stall();
      // Within the buffer: answered at once, as async writes are.
      const within = await check('qemu-io', ['-f', 'raw', '-c', 'write -P 0x61 0 128k', small.uri('b1')]);
      assert.ok(opSeconds(within.stdout) < 1, within.stdout);
      // Past it: the writer waits for the stalled replica...
      const t0 = Date.now();
      const past = check('qemu-io', ['-f', 'raw', '-c', 'write -P 0x62 1M 1M', small.uri('b1')], {
        timeoutMs: 30_000,
      });
      const settled = past.then(() => Date.now() - t0);
      await new Promise((r) => setTimeout(r, 1000));
      assert.equal(await Promise.race([settled, Promise.resolve(-1)]), -1, 'held past the buffer');
      assert.equal((await replicaList(small, 'b1')).replicas[0]!.heldWriters, 1);
      const table = await small.cli('replica', 'list', 'b1');
      assert.match(table.stdout, /in-sync \(writes held: 1\)/);
      // ...but a snapshot's barrier lets it go rather than wait for the replica.
      const snap = await small.cli('snapshot', 'create', 'b1', 'held');
      assert.equal(snap.code, 0, snap.stderr);
      assert.ok((await settled) < 5000, 'released by the snapshot, before the 6 s timeout');
      // Held again afterwards, until the timeout drops the replica to behind.
      const again = await check('qemu-io', ['-f', 'raw', '-c', 'write -P 0x63 2M 1M', small.uri('b1')], {
        timeoutMs: 30_000,
      });
      assert.ok(opSeconds(again.stdout) >= 1, again.stdout);
      assert.notEqual((await replicaList(small, 'b1')).replicas[0]!.state, 'in-sync');

      proxy.resume();
      await waitForState(small, 'b1', 'in-sync', true);
      await identical(small.uri('b1'), replica.uri('b1'));
    } finally {
      await small.destroy();
      await proxy.close();
    }
  });

  it('throttles the initial sync to --max-rate, and lists a --dr replica first', async () => {
    await createVolume(primary, 't1', '16M');
    const data = path.join(dir, 't1.bin');
    writeRandomFile(data, 8 * MiB);
    await check('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', data, primary.uri('t1')]);
    const t0 = Date.now();
    const add = await primary.cli('replica', 'add', 't1', '--to', to, '--dr', '--max-rate', '2M');
    assert.equal(add.code, 0, add.stderr);
    await waitForState(primary, 't1', 'in-sync');
    const seconds = (Date.now() - t0) / 1000;
    // 8 MiB of random blocks at 2 MiB/s, with a second's burst: at least 3 s.
    assert.ok(seconds >= 2.5, `the sync took ${seconds} s`);
    const l = await primary.cli('replica', 'list', 't1');
    assert.match(l.stdout, /async DR/);
    const twice = await primary.cli('replica', 'add', 't1', '--to', '127.0.0.1:1', '--dr');
    assert.equal(twice.code, 1);
    assert.match(twice.stderr, /already has a --dr replica/);
    await identical(primary.uri('t1'), replica.uri('t1'));
  });

  it('resumes the sync after the primary is killed mid-way, and resends what a crash may have cut', async () => {
    await createVolume(primary, 'r2', '64M');
    const data = path.join(dir, 'r2.bin');
    writeRandomFile(data, 32 * MiB);
    await check('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', data, primary.uri('r2')]);
    // Slow enough to kill it half-way: one 4 MiB chunk a second.
    assert.equal((await primary.cli('replica', 'add', 'r2', '--to', to, '--max-rate', '4M')).code, 0);
    const deadline = Date.now() + 30_000;
    for (;;) {
      const s = (
        JSON.parse((await primary.cli('replica', 'list', 'r2', '--json')).stdout) as {
          replicas: Array<{ sync: { remainingChunks: number } }>;
        }
      ).replicas[0]!.sync;
      if (s.remainingChunks <= 12) break;
      assert.ok(Date.now() < deadline, 'the sync never got going');
      await new Promise((r) => setTimeout(r, 100));
    }
    // Writes acknowledged just before the crash, which the replica may not have got.
    await check('fio', [
      '--name=r2',
      '--ioengine=nbd',
      `--uri=${primary.uri('r2')}`,
      '--rw=write',
      '--bs=64k',
      '--offset=60M',
      '--size=2M',
      '--buffer_pattern=0x5e',
    ]);
    const primaryDir = primary.dataDir;
    await primary.kill();
    primary = await Gateway.start({
      dataDir: primaryDir,
      args: ['--cluster-key', keyFile, '--mirror-timeout', '2'],
    });
    const resumed = await replicaList(primary, 'r2');
    const total = (resumed.replicas[0] as unknown as { sync: { totalChunks: number } }).sync.totalChunks;
    assert.ok(total > 0 && total < 16, `the restarted sync covers ${total} of 16 chunks`);
    await waitForState(primary, 'r2', 'in-sync', true);
    await identical(primary.uri('r2'), replica.uri('r2'));
  });

  it('resizes a mirrored volume: the replica copy follows, grown and shrunk, and stays identical', async () => {
    await createVolume(primary, 'rs', '16M');
    assert.equal((await primary.cli('replica', 'add', 'rs', '--to', to, '--mode', 'sync')).code, 0);
    await waitForState(primary, 'rs', 'in-sync');
    await check('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 1M 2M', primary.uri('rs')]);
    const grown = await primary.cli('volume', 'resize', 'rs', '--size', '48M');
    assert.equal(grown.code, 0, grown.stderr);
    await waitForState(primary, 'rs', 'in-sync', true);
    // Writes past the old end follow the new size to the replica.
    await check('qemu-io', ['-f', 'raw', '-c', 'write -P 0x4d 40M 1M', primary.uri('rs')]);
    await waitForState(primary, 'rs', 'in-sync', true);
    const size = await check('nbdinfo', ['--size', replica.uri('rs')]);
    assert.equal(size.stdout.trim(), String(48 * MiB));
    await identical(primary.uri('rs'), replica.uri('rs'));
    const shrunk = await primary.cli('volume', 'resize', 'rs', '--size', '8M');
    assert.equal(shrunk.code, 0, shrunk.stderr);
    await waitForState(primary, 'rs', 'in-sync', true);
    // qemu-img compare would pass a longer copy whose tail reads as zeroes: check the size too.
    const after = await check('nbdinfo', ['--size', replica.uri('rs')]);
    assert.equal(after.stdout.trim(), String(8 * MiB));
    await identical(primary.uri('rs'), replica.uri('rs'));
  });

  it('does not shrink a replica copy under its readers, and follows once they leave', async () => {
    await createVolume(primary, 'rk', '16M');
    assert.equal((await primary.cli('replica', 'add', 'rk', '--to', to)).code, 0);
    await waitForState(primary, 'rk', 'in-sync');
    const reader = await RawClient.connect(replica.socket);
    await reader.go('rk');
    try {
      assert.equal((await primary.cli('volume', 'resize', 'rk', '--size', '8M')).code, 0);
      const deadline = Date.now() + 20_000;
      let l = await replicaList(primary, 'rk');
      while (!/cannot shrink/.test(l.replicas[0]?.lastError ?? '') && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 200));
        l = await replicaList(primary, 'rk');
      }
      assert.match(l.replicas[0]?.lastError ?? '', /cannot shrink to 8388608 bytes while 1 client/);
      assert.notEqual(l.replicas[0]?.state, 'in-sync');
      const size = await check('nbdinfo', ['--size', replica.uri('rk')]);
      assert.equal(size.stdout.trim(), String(16 * MiB));
    } finally {
      reader.disconnect();
    }
    await waitForState(primary, 'rk', 'in-sync', true);
    const size = await check('nbdinfo', ['--size', replica.uri('rk')]);
    assert.equal(size.stdout.trim(), String(8 * MiB));
  });

  it('removes a replica: writes stop following, its copy stays', async () => {
    const rm = await primary.cli('replica', 'remove', 'a1', to);
    assert.equal(rm.code, 0, rm.stderr);
    assert.deepEqual((await replicaList(primary, 'a1')).replicas, []);
    await check('qemu-io', ['-f', 'raw', '-c', 'write -P 0x99 0 64k', primary.uri('a1')]);
    const r = await run('qemu-img', [
      'compare',
      '-f',
      'raw',
      '-F',
      'raw',
      primary.uri('a1'),
      replica.uri('a1'),
    ]);
    assert.equal(r.code, 1, 'the removed replica no longer follows');
  });
});
