// When a primary's activity log may forget a chunk. A marked chunk is resent
// in full after a crash or a reconnect; an unmarked one is taken to be the
// same on both sides. So a chunk is unmarked only once the replica holds it
// durably and this store does too: were the primary to reopen without a change
// the replica kept, nothing would tell it to send that chunk again.

/** What a mirror knows of each chunk when it settles its activity log. */
export interface ChunkActivity {
  /** Set for chunks with changes in a batch filling, in flight, or acknowledged but not durable there. */
  busy: Uint8Array;
  /** Changes under way (activated, not yet captured into a batch). */
  active: Uint32Array;
  /** When a change last touched the chunk (performance.now()). */
  touched: Float64Array;
  /** Chunks the replica may lack: the sync still owes them. */
  dirty: { has(chunk: number): boolean };
}

/**
 * Whether chunk `c` may leave the activity log: nothing of it pending for the replica,
 * left alone since `coolBefore` (a hot chunk unmarked between two writes would make its
 * next write wait for a durable mark), and last changed before `durableAsOf`, the point
 * this store has committed up to.
 */
export function maySettle(c: number, a: ChunkActivity, coolBefore: number, durableAsOf: number): boolean {
  if (a.busy[c] || a.active[c] || a.dirty.has(c)) return false;
  const touched = a.touched[c]!;
  return touched <= coolBefore && touched < durableAsOf;
}
