// What the dedup store reports and gives back, through the real gateway:
// dedup across volumes shows in stats, and after a volume is deleted and
// the store compacted, at least 90% of the space its unique data used is
// free again, with fsck clean afterwards.

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { BIN, Gateway } from '../helpers/gateway';
import { check, run } from '../helpers/run';

interface DedupStats {
  uniqueBlocks: number;
  mappedBlocks: number;
  storedBytes: number;
  segmentBytes: number;
  dedupRatio: number;
  compressionRatio: number;
  reclaimableBytes: number;
  indexBytesPerBlock: number;
}

let gw: Gateway;
let image: string;
before(async () => {
  gw = await Gateway.start();
  image = path.join(gw.dataDir, 'image.raw');
  // 16 MiB: half random, half text that compresses but differs in every block, as real disks mix.
  const parts: Buffer[] = [];
  for (let i = 0; i < 16; i++) {
    if (i % 2) parts.push(crypto.randomBytes(1 << 20));
    else {
      let text = '';
      for (let line = 0; text.length < 1 << 20; line++)
        text += `mib ${i} line ${line}: the quick brown fox\n`;
      parts.push(Buffer.from(text.slice(0, 1 << 20)));
    }
  }
  fs.writeFileSync(image, Buffer.concat(parts));
});
after(async () => gw.destroy());

async function stats(): Promise<DedupStats> {
  const r = await gw.cli('stats', '--json');
  assert.equal(r.code, 0, r.stderr);
  return (JSON.parse(r.stdout) as { dedup: DedupStats }).dedup;
}

async function copyInto(volume: string): Promise<void> {
  assert.equal((await gw.cli('volume', 'create', volume, '--size', '16M')).code, 0);
  await check('nbdcopy', [image, gw.uri(volume)], { timeoutMs: 60_000 });
}

describe('dedup space', () => {
  it('stores the same image written to three volumes once', async () => {
    await copyInto('a');
    await copyInto('b');
    await copyInto('c');
    const s = await stats();
    assert.equal(s.mappedBlocks, 3 * 4096);
    assert.equal(s.uniqueBlocks, 4096);
    assert.ok(s.dedupRatio >= 3, `dedup ratio ${s.dedupRatio}`);
    assert.ok(s.compressionRatio > 1, `compression ratio ${s.compressionRatio}`);
  });

  it('gives back 90% of a deleted volume’s unique space after compact', async () => {
    await check('qemu-io', ['-f', 'raw', gw.uri('c'), '-c', 'write -P 0x61 0 8M']); // c's own data
    await check('nbdcopy', [gw.uri('a'), gw.uri('c')], { timeoutMs: 60_000 }); // then shared again
    const own = crypto.randomBytes(8 << 20);
    const ownFile = path.join(gw.dataDir, 'own.raw');
    fs.writeFileSync(ownFile, own);
    assert.equal((await gw.cli('volume', 'create', 'solo', '--size', '8M')).code, 0);
    await check('nbdcopy', [ownFile, gw.uri('solo')], { timeoutMs: 60_000 });
    const before = await stats();
    assert.equal((await gw.cli('volume', 'delete', 'solo')).code, 0);
    const c = await gw.cli('compact', '--json');
    assert.equal(c.code, 0, c.stderr);
    const after = await stats();
    const soloBytes = 8 << 20; // random data: lz4 gains nothing
    assert.ok(
      before.segmentBytes - after.segmentBytes >= 0.9 * soloBytes,
      `segments went from ${before.segmentBytes} to ${after.segmentBytes}`,
    );
    await check('nbdcopy', [gw.uri('b'), path.join(gw.dataDir, 'b.out')], { timeoutMs: 60_000 });
    assert.ok(fs.readFileSync(path.join(gw.dataDir, 'b.out')).equals(fs.readFileSync(image)));
  });

  it('leaves a store fsck finds clean', async () => {
    assert.equal((await gw.stop()).code, 0);
    const r = await run(process.execPath, [BIN, 'fsck', '--data', gw.dataDir], { timeoutMs: 60_000 });
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.match(r.stdout, /^clean$/m);
  });
});
