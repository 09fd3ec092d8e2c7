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

describe('dedup reporting', () => {
  let g: Gateway;
  before(async () => {
    g = await Gateway.start();
    for (const v of ['x', 'y', 'z'])
      assert.equal((await g.cli('volume', 'create', v, '--size', '4M')).code, 0);
    await check('qemu-io', ['-f', 'raw', g.uri('x'), '-c', 'write -P 0x11 0 2M', '-c', 'write -z 2M 1M']);
    await check('qemu-io', [
      '-f',
      'raw',
      g.uri('y'),
      '-c',
      'write -P 0x11 0 1M',
      '-c',
      'write -P 0x22 1M 1M',
    ]);
  });
  after(async () => g.destroy());

  it('reports each pair of volumes’ common content as a share of the larger', async () => {
    const r = await g.cli('similarity', '--json');
    assert.equal(r.code, 0, r.stderr);
    const pairs = JSON.parse(r.stdout) as Array<{
      a: string;
      b: string;
      commonBytes: number;
      similarity: number;
    }>;
    // x and y both hold 256 blocks of the 0x11 pattern (one stored block).
    assert.deepEqual(
      pairs.filter((p) => p.a !== 'disk0').map((p) => [p.a, p.b, p.commonBytes, p.similarity]),
      [
        ['x', 'y', 1 << 20, 0.25],
        ['x', 'z', 0, 0],
        ['y', 'z', 0, 0],
      ],
    );
  });

  it('shows a volume’s logical, zero and exclusive space in volume info', async () => {
    const r = await g.cli('volume', 'info', 'y', '--json');
    const info = JSON.parse(r.stdout) as {
      dedup: { logicalBytes: number; zeroBlocks: number; exclusiveBytes: number; fragmentation: number };
    };
    // y: 1M of a block shared with x, 1M of its own (one stored block, referenced 256 times).
    // Each MiB repeats one block: its record is read once for all 256 (one read per MiB).
    assert.deepEqual(info.dedup, {
      logicalBytes: 2 << 20,
      zeroBlocks: 0,
      exclusiveBytes: 0,
      fragmentation: 1,
    });
    const x = JSON.parse((await g.cli('volume', 'info', 'x', '--json')).stdout) as {
      dedup: { zeroBlocks: number };
    };
    assert.equal(x.dedup.zeroBlocks, 256);
  });
});

describe('dedup recovery', () => {
  it('releases the blocks of a volume whose delete was cut short after the catalog write', async () => {
    const g = await Gateway.start();
    try {
      assert.equal((await g.cli('volume', 'create', 'ghost', '--size', '4M')).code, 0);
      await check('qemu-io', ['-f', 'raw', g.uri('ghost'), '-c', 'write -P 0x77 0 4M']);
      assert.equal((await g.stop()).code, 0);
      // The crash window of a delete: the catalog no longer lists the volume, the store still has it.
      const catalog = path.join(g.dataDir, 'volumes.json');
      const doc = JSON.parse(fs.readFileSync(catalog, 'utf8')) as { volumes: Array<{ name: string }> };
      doc.volumes = doc.volumes.filter((v) => v.name !== 'ghost');
      fs.writeFileSync(catalog, JSON.stringify(doc));
      const again = await Gateway.start({ dataDir: g.dataDir });
      try {
        await again.waitForLog(/volume ghost, which the catalog no longer has: releasing them/);
        const s = JSON.parse((await again.cli('stats', '--json')).stdout) as {
          dedup: { mappedBlocks: number };
        };
        assert.equal(s.dedup.mappedBlocks, 0);
      } finally {
        assert.equal((await again.stop()).code, 0);
      }
      const r = await run(process.execPath, [BIN, 'fsck', '--data', g.dataDir], { timeoutMs: 60_000 });
      assert.equal(r.code, 0, r.stdout + r.stderr);
    } finally {
      await g.destroy();
    }
  });
});
