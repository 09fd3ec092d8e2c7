// The gateway's NBD connections as the kernel reports them (ss, iproute2).

import assert from 'node:assert/strict';
import fs from 'node:fs';
import { describe, it } from 'node:test';
import { UNIX_SEND_BUFFER } from '../../gateway/nbd/direct-socket';
import { Gateway } from '../helpers/gateway';
import { RawClient } from '../helpers/raw-client';
import { check } from '../helpers/run';

describe('NBD connections over a Unix socket', () => {
  it('get a send buffer for 1 MiB read replies, as far as net.core.wmem_max allows', async () => {
    const gw = await Gateway.start();
    try {
      const client = await RawClient.connect(gw.socket);
      await client.go('disk0');
      const wmemMax = Number(fs.readFileSync('/proc/sys/net/core/wmem_max', 'utf8'));
      // The kernel keeps twice the size asked for (and reports that), past its cap none.
      const expected = 2 * Math.min(UNIX_SEND_BUFFER, wmemMax);
      const out = (await check('ss', ['-xmpH'])).stdout;
      const mine = out
        .split('\n')
        .filter((l) => l.includes(` ${gw.socket} `) && l.includes(`pid=${gw.proc.pid},`));
      assert.equal(mine.length, 1, `the gateway's end of the connection in:\n${out}`);
      assert.equal(Number(/\btb(\d+)/.exec(mine[0]!)?.[1]), expected, mine[0]);
      client.destroy();
    } finally {
      await gw.destroy();
    }
  });
});
