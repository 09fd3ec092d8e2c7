// Failover between two real gateway processes: the primary is SIGKILLed, its
// sync replica is promoted and serves every acknowledged write; the old
// primary, restarted, meets the newer generation, refuses writes (split brain)
// until demoted, keeps what it held as a volume of its own, and then resyncs
// as a replica of the new primary.

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Gateway } from '../helpers/gateway';
import { TcpProxy } from '../helpers/tcp-proxy';
import { createVolume, scratchDir } from '../helpers/fixtures';
import { check, run } from '../helpers/run';

const dir = scratchDir('blockgate-failover-');
const keyFile = path.join(dir, 'cluster.key');

function replicationPort(gw: Gateway): number {
  return Number(/replication: gateway [0-9a-f]{32} listening on 127\.0\.0\.1:(\d+)/.exec(gw.log)![1]);
}

interface Listing {
  role: string;
  generation: number;
  splitBrain: { peer: string; generation: number } | null;
  replicas: Array<{ state: string; lagBytes: number }>;
}

async function listing(gw: Gateway, volume: string): Promise<Listing> {
  const r = await gw.cli('replica', 'list', volume, '--json');
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout) as Listing;
}

async function until(what: string, probe: () => Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await probe())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const inSync = (gw: Gateway, volume: string) => async (): Promise<boolean> =>
  (await listing(gw, volume)).replicas.every((r) => r.state === 'in-sync' && r.lagBytes === 0);

describe('failover', () => {
  let a: Gateway; // the first primary
  let b: Gateway; // its replica, promoted
  const listenArgs = (port = 0): string[] => [
    '--cluster-key',
    keyFile,
    '--replication-listen',
    `127.0.0.1:${port}`,
    '--mirror-timeout',
    '2',
  ];

  before(async () => {
    fs.writeFileSync(keyFile, crypto.randomBytes(32), { mode: 0o600 });
    [a, b] = await Promise.all([
      Gateway.start({ args: listenArgs() }),
      Gateway.start({ args: listenArgs() }),
    ]);
  });
  after(async () => {
    await a?.destroy();
    await b?.destroy();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('promotes a sync replica after the primary dies; the old primary stops, is demoted and resyncs', async () => {
    // a reaches b through a proxy, to hold the restarted a's first contact back.
    const proxy = await TcpProxy.start({ host: '127.0.0.1', port: replicationPort(b) });
    after(() => proxy.close());
    await createVolume(a, 'f1', '32M');
    const add = await a.cli('replica', 'add', 'f1', '--to', `127.0.0.1:${proxy.port}`, '--mode', 'sync');
    assert.equal(add.code, 0, add.stderr);
    await until('the first sync', inSync(a, 'f1'));
    await check('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0x1f 0 4M',
      '-c',
      'write -P 0x2f 8M 1M',
      a.uri('f1'),
    ]);

    // The primary dies; every write it acknowledged is on the sync replica.
    const aDir = a.dataDir;
    const aPort = replicationPort(a);
    await a.kill();
    const promote = await b.cli('promote', 'f1');
    assert.equal(promote.code, 0, promote.stderr);
    assert.match(promote.stdout, /generation 2/);
    await check('qemu-io', ['-f', 'raw', '-c', 'read -P 0x1f 0 4M', '-c', 'read -P 0x2f 8M 1M', b.uri('f1')]);
    await check('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3f 16M 1M', b.uri('f1')]);

    // The old primary comes back, still mirroring to b. A write made before b has answered
    // waits for the answer, and so meets the split brain instead of diverging.
    proxy.stall();
    // A long --mirror-timeout: on a loaded machine the start alone may take seconds, and the
    // hold must outlast the stall.
    const patient = [...listenArgs(aPort).slice(0, -1), '60'];
    a = await Gateway.start({ dataDir: aDir, args: patient });
    let answered = false;
    const write = run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x4f 0 4k', a.uri('f1')]).finally(
      () => (answered = true),
    );
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(answered, false, 'the write was answered before the replica was heard from');
    proxy.resume();
    const refused = await write;
    assert.match(refused.stdout + refused.stderr, /Operation not permitted|Permission denied/);
    await a.waitForLog(/split brain: gateway [0-9a-f]{32} holds it at generation 2/);
    const sb = await listing(a, 'f1');
    assert.equal(sb.splitBrain?.generation, 2);
    assert.match((await a.cli('replica', 'list', 'f1')).stdout, /SPLIT BRAIN/);

    // Demoted, it keeps what it held, and takes the new primary's mirror.
    const demote = await a.cli('demote', 'f1');
    assert.equal(demote.code, 0, demote.stderr);
    assert.match(demote.stdout, /kept as f1\.g1/);
    await check('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x1f 0 4M', a.uri('f1.g1')]);
    const back = await b.cli('replica', 'add', 'f1', '--to', `127.0.0.1:${aPort}`, '--mode', 'sync');
    assert.equal(back.code, 0, back.stderr);
    await until('the resync of the old primary', inSync(b, 'f1'));
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', b.uri('f1'), a.uri('f1')]);
    assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
    assert.equal((await listing(a, 'f1')).role, 'replica');
    assert.equal((await listing(a, 'f1')).generation, 2);
  });

  it('refuses to promote a primary and to demote a replica', async () => {
    const p = await b.cli('promote', 'f1');
    assert.equal(p.code, 1);
    assert.match(p.stderr, /already a primary/);
    const d = await a.cli('demote', 'f1');
    assert.equal(d.code, 1);
    assert.match(d.stderr, /already a replica/);
  });

  it('takes writes after --mirror-timeout when a restarted primary cannot reach its replica', async () => {
    await createVolume(b, 'h1', '8M');
    const add = await b.cli('replica', 'add', 'h1', '--to', `127.0.0.1:${replicationPort(a)}`);
    assert.equal(add.code, 0, add.stderr);
    await until('the first sync of h1', inSync(b, 'h1'));
    const aDir = a.dataDir;
    const aPort = replicationPort(a);
    const bPort = replicationPort(b);
    await a.kill();
    await b.stop();
    const restarted = Date.now();
    b = await Gateway.start({ dataDir: b.dataDir, args: listenArgs(bPort) });
    await check('qemu-io', ['-f', 'raw', '-c', 'write -P 0x61 0 64k', b.uri('h1')]);
    // --mirror-timeout is 2 s here, counted from the volume's opening.
    assert.ok(Date.now() - restarted >= 2000, `answered ${Date.now() - restarted} ms after the restart`);
    await b.waitForLog(/did not answer within 2000 ms: taking writes/);
    a = await Gateway.start({ dataDir: aDir, args: listenArgs(aPort) });
  });
});
