// The NBD durability contract under SIGKILL: a write acknowledged with FUA,
// or followed by an acknowledged FLUSH, survives a crash at any moment;
// every block reads back a version that was really written to it (never
// garbage); the store opens with no manual step and fsck finds it clean.

import assert from 'node:assert/strict';
import { ChildProcess, spawn } from 'node:child_process';
import { after, describe, it } from 'node:test';
import { Cmd, CmdFlag } from '../../protocol/nbd/constants';
import { BIN, Gateway } from '../helpers/gateway';
import { RawClient } from '../helpers/raw-client';
import { run } from '../helpers/run';

const ROUNDS = Number(process.env.BLOCKGATE_CRASH_ROUNDS ?? 20);
const BLOCKS = 256; // tracked region: the first 1 MiB
const QD = 8;

interface Version {
  tag: number;
  durable: boolean;
}

/** A 4 KiB block naming its writer: the tag repeated. */
function tagged(tag: number): Buffer {
  const b = Buffer.allocUnsafe(4096);
  for (let i = 0; i < 4096; i += 4) b.writeUInt32BE(tag, i);
  return b;
}

function tagOf(b: Buffer): number | 'garbage' {
  const t = b.readUInt32BE(0);
  for (let i = 0; i < 4096; i += 4) if (b.readUInt32BE(i) !== t) return 'garbage';
  return t;
}

/** Pipelined tagged writes until the connection dies; records what was acknowledged and how. */
async function writeUntilKilled(client: RawClient, history: Version[][], round: number): Promise<void> {
  let seq = 0;
  const inflight = new Map<number, { lba: number; version: Version; fua: boolean }>();
  const acked: Version[] = []; // acknowledged, not yet known durable
  try {
    for (;;) {
      while (inflight.size < QD) {
        seq++;
        const cookie = seq;
        if (seq % 16 === 0) {
          client.request({ type: Cmd.FLUSH, cookieLo: cookie });
          inflight.set(cookie, { lba: -1, version: { tag: 0, durable: false }, fua: false });
          // Everything acknowledged before the FLUSH was sent is durable once it is answered.
          const covered = acked.splice(0);
          inflight.get(cookie)!.version = { tag: covered.length, durable: false };
          (inflight.get(cookie) as unknown as { covered: Version[] }).covered = covered;
          continue;
        }
        const lba = Math.floor(Math.random() * BLOCKS);
        const fua = seq % 5 === 0;
        const version: Version = { tag: round * 1_000_000 + seq, durable: false };
        history[lba]!.push(version);
        inflight.set(cookie, { lba, version, fua });
        client.request(
          { type: Cmd.WRITE, cookieLo: cookie, offset: lba * 4096, flags: fua ? CmdFlag.FUA : 0 },
          tagged(version.tag),
        );
      }
      const reply = await client.simpleReply();
      const done = inflight.get(reply.cookieLo)!;
      inflight.delete(reply.cookieLo);
      assert.equal(reply.error, 0);
      if (done.lba === -1) {
        for (const v of (done as unknown as { covered: Version[] }).covered) v.durable = true;
      } else if (done.fua) done.version.durable = true;
      else acked.push(done.version);
    }
  } catch {
    // The gateway was killed: the connection is gone mid-stream.
  }
}

function fioLoad(uri: string): ChildProcess {
  return spawn(
    'fio',
    [
      '--name=crashload',
      // Jobs as threads: SIGKILL to fio then ends the job too (a forked job process
      // outlived it, stuck forever).
      '--thread',
      '--ioengine=nbd',
      `--uri=${uri}`,
      '--rw=randwrite',
      '--bs=16k',
      '--iodepth=8',
      '--offset=32M',
      '--size=32M',
      '--time_based',
      '--runtime=30',
      '--verify_state_save=0',
    ],
    { stdio: 'ignore' },
  );
}

describe('crash safety', () => {
  let gw: Gateway | null = null;
  let dataDir = '';
  after(async () => {
    await gw?.destroy();
  });

  it(`keeps every durable write through ${ROUNDS} SIGKILLs under load, and fsck stays clean`, async (t) => {
    gw = await Gateway.start();
    dataDir = gw.dataDir;
    assert.equal((await gw.cli('volume', 'create', 'crash', '--size', '64M')).code, 0);
    const history: Version[][] = Array.from({ length: BLOCKS }, () => []);
    let durableChecked = 0;
    for (let round = 1; round <= ROUNDS; round++) {
      const client = await RawClient.connect(gw.socket);
      await client.go('crash');
      const fio = fioLoad(gw.uri('crash'));
      const writing = writeUntilKilled(client, history, round);
      await new Promise((r) => setTimeout(r, 300 + Math.random() * 900));
      await gw.kill();
      fio.kill('SIGKILL');
      await writing;
      client.destroy();

      const fsck = await run(process.execPath, [BIN, 'fsck', '--data', dataDir], { timeoutMs: 60_000 });
      assert.equal(fsck.code, 0, `round ${round}: fsck failed:\n${fsck.stdout}${fsck.stderr}`);

      // Every other run encodes fio's 16 KiB writes on the pool (off by default on 2 cores).
      gw = await Gateway.start({ dataDir, args: round % 2 === 1 ? ['--hash-pool', '16K'] : [] });
      const reader = await RawClient.connect(gw.socket);
      await reader.go('crash');
      for (let lba = 0; lba < BLOCKS; lba++) {
        reader.request({ type: Cmd.READ, cookieLo: lba, offset: lba * 4096, length: 4096 });
        const reply = await reader.simpleReply();
        assert.equal(reply.error, 0);
        const got = tagOf(await reader.read(4096));
        assert.notEqual(got, 'garbage', `round ${round}: block ${lba} holds garbage`);
        const versions = history[lba]!;
        let lastDurable = -1;
        versions.forEach((v, i) => {
          if (v.durable) lastDurable = i;
        });
        // Acceptable: the last durable version or anything written after it (zeroes if none was durable).
        const allowed = new Set(versions.slice(Math.max(lastDurable, 0)).map((v) => v.tag));
        if (lastDurable === -1) allowed.add(0);
        assert.ok(
          allowed.has(got as number),
          `round ${round}: block ${lba} reads tag ${got}, allowed ${[...allowed]}`,
        );
        if (lastDurable >= 0) durableChecked++;
        // What was read is now the block's only history: it is on disk after this restart.
        history[lba] = [{ tag: got as number, durable: true }];
      }
      reader.disconnect();
    }
    t.diagnostic(`${ROUNDS} crashes, ${durableChecked} durable block versions checked`);
  });
});
