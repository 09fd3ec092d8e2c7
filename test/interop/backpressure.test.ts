// A client that pipelines far more than the gateway should hold, and never
// reads its replies, costs bounded memory, and the connection still works
// once the client catches up.

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Cmd } from '../../protocol/nbd/constants';
import { Gateway } from '../helpers/gateway';
import { RawClient } from '../helpers/raw-client';

const MiB = 1024 * 1024;
let gw: Gateway;
before(async () => {
  gw = await Gateway.start();
});
after(async () => gw.destroy());

async function rss(): Promise<number> {
  const r = await gw.cli('stats', '--json');
  return (JSON.parse(r.stdout) as { rssBytes: number }).rssBytes;
}

describe('backpressure', () => {
  it('holds a stalled client to bounded memory and answers it fully afterwards', async (t) => {
    const c = await RawClient.connect(gw.socket);
    await c.go('disk0');
    c.socket.pause(); // the client stops reading replies
    const requests = 1024; // 1 GiB of READ replies
    for (let i = 0; i < requests; i++)
      c.request({ type: Cmd.READ, cookieLo: i, offset: i * MiB, length: MiB });
    await new Promise((r) => setTimeout(r, 2000));
    const held = await rss();
    t.diagnostic(`gateway RSS with 1 GiB of replies pending: ${Math.round(held / MiB)} MiB`);
    assert.ok(held < 300 * MiB, `gateway RSS ${Math.round(held / MiB)} MiB with a stalled client`);

    c.socket.resume();
    const seen = new Set<number>();
    for (let i = 0; i < requests; i++) {
      const reply = await c.simpleReply();
      assert.equal(reply.error, 0);
      seen.add(reply.cookieLo);
      await c.read(MiB, 20_000);
    }
    assert.equal(seen.size, requests);
    c.request({ type: Cmd.FLUSH, cookieLo: 1 << 20 });
    assert.deepEqual(await c.simpleReply(), { error: 0, cookieLo: 1 << 20 });
    c.disconnect();
  });
});
