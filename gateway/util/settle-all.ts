/**
 * Waits for every promise, then rejects with the first rejection if any. Promise.all
 * rejects at the first failure while the rest run on: a request whose blocks are still
 * being stored must not answer, or release its buffers and locks, before they finish.
 */
export async function settleAll(promises: readonly Promise<unknown>[]): Promise<void> {
  if (promises.length === 0) return;
  const outcomes = await Promise.allSettled(promises);
  for (const o of outcomes) if (o.status === 'rejected') throw o.reason;
}
