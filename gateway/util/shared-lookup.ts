// Host name lookups for outgoing links, one at a time per name. dns.lookup runs
// getaddrinfo on libuv's pool, which the gateway keeps small (bin/blockgate), and a
// connect that times out does not cancel its lookup. With the resolver down, every
// retry of every mirror would park one more pool thread in getaddrinfo until segment
// writes and reads had none left; now a name's retries wait for its one lookup.

import dns from 'node:dns';
import type { LookupFunction } from 'node:net';

type LookupCallback = (err: NodeJS.ErrnoException | null, address: unknown, family?: number) => void;

/** A LookupFunction for net.connect that shares one dns.lookup among callers asking alike. */
export function sharedLookup(resolve: typeof dns.lookup = dns.lookup): LookupFunction {
  const inFlight = new Map<string, LookupCallback[]>();
  return ((hostname: string, options: dns.LookupOptions, callback: LookupCallback) => {
    const key = `${hostname}\0${JSON.stringify(options)}`;
    const waiting = inFlight.get(key);
    if (waiting) {
      waiting.push(callback);
      return;
    }
    const callbacks = [callback];
    inFlight.set(key, callbacks);
    resolve(hostname, options, ((err: NodeJS.ErrnoException | null, address: unknown, family?: number) => {
      inFlight.delete(key);
      for (const cb of callbacks) cb(err, address, family);
    }) as never);
  }) as LookupFunction;
}
