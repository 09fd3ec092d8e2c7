// Outgoing links' name lookups: retries of a name wait for its one lookup in flight
// instead of each parking another libuv pool thread in getaddrinfo.

import assert from 'node:assert/strict';
import dns from 'node:dns';
import net from 'node:net';
import { describe, it } from 'node:test';
import { sharedLookup } from '../../gateway/util/shared-lookup';

type Answer = (err: NodeJS.ErrnoException | null, address?: string, family?: number) => void;

/** A resolver that answers only when told to, and counts what it was asked. */
function heldResolver(): {
  resolve: typeof dns.lookup;
  asked: string[];
  answer: (i: number, err?: Error) => void;
} {
  const asked: string[] = [];
  const pending: Answer[] = [];
  const resolve = ((hostname: string, _options: unknown, cb: Answer) => {
    asked.push(hostname);
    pending.push(cb);
  }) as unknown as typeof dns.lookup;
  const answer = (i: number, err?: Error): void => {
    if (err) pending[i]!(err as NodeJS.ErrnoException);
    else pending[i]!(null, '127.0.0.1', 4);
  };
  return { resolve, asked, answer };
}

function ask(lookup: net.LookupFunction, host: string): Promise<{ err: Error | null; address: unknown }> {
  return new Promise((resolve) => lookup(host, { family: 0 }, (err, address) => resolve({ err, address })));
}

describe('shared host name lookups', () => {
  it('asks the resolver once for callers that ask for one name at the same time', async () => {
    const r = heldResolver();
    const lookup = sharedLookup(r.resolve);
    const a = ask(lookup, 'replica.example');
    const b = ask(lookup, 'replica.example');
    assert.deepEqual(r.asked, ['replica.example']);
    r.answer(0);
    assert.deepEqual(await a, { err: null, address: '127.0.0.1' });
    assert.deepEqual(await b, { err: null, address: '127.0.0.1' });
  });

  it('asks again once the lookup in flight has answered', async () => {
    const r = heldResolver();
    const lookup = sharedLookup(r.resolve);
    const a = ask(lookup, 'replica.example');
    r.answer(0);
    await a;
    const b = ask(lookup, 'replica.example');
    assert.equal(r.asked.length, 2);
    r.answer(1);
    await b;
  });

  it('looks up different names apart, and hands a failure to every caller of its name', async () => {
    const r = heldResolver();
    const lookup = sharedLookup(r.resolve);
    const a = ask(lookup, 'one.example');
    const b = ask(lookup, 'one.example');
    const c = ask(lookup, 'two.example');
    assert.deepEqual(r.asked, ['one.example', 'two.example']);
    r.answer(0, Object.assign(new Error('getaddrinfo EAI_AGAIN one.example'), { code: 'EAI_AGAIN' }));
    r.answer(1);
    assert.match(String((await a).err), /EAI_AGAIN/);
    assert.match(String((await b).err), /EAI_AGAIN/);
    assert.equal((await c).err, null);
  });

  it('connects a socket to a name through the real resolver', async () => {
    const server = net.createServer((s) => s.end());
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as net.AddressInfo).port;
    try {
      const socket = net.connect({ host: 'localhost', port, family: 4, lookup: sharedLookup() });
      await new Promise<void>((resolve, reject) => {
        socket.once('connect', resolve);
        socket.once('error', reject);
      });
      socket.destroy();
    } finally {
      await new Promise((resolve) => server.close(resolve));
    }
  });
});
