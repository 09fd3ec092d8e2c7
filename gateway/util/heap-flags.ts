// The V8 heap settings the gateway process runs with. Node takes them only on
// its own command line (NODE_OPTIONS refuses them, and V8 reads them once, as
// the heap is made), so `serve` executes itself again with them: execv keeps
// the process id, so a supervisor's or a test's signal still reaches the
// gateway, and the stdio stays as it was.
//
// Why: the gateway's live JS heap is small (about 10 MiB) while its young
// generation grows to 16 MiB, and V8 starts a full mark whenever the old
// generation's room below its limit is less than the young generation could
// promote. Measured 2026-11-26 under fio 4k randwrite QD32: a mark-compact
// every 45 ms on a sync-mirrored primary (every 150-200 ms with no replica),
// the concurrent markers taking ~40% of the process's CPU. With a 64 MiB
// floor for the old generation, one every 0.5-1 s.

import { native } from '../../native-bindings';

/** Flags the gateway adds to Node's when they are not given (by name) already. */
export const HEAP_FLAGS: readonly string[] = ['--initial-old-space-size=64'];

function flagName(arg: string): string {
  const eq = arg.indexOf('=');
  return (eq < 0 ? arg : arg.slice(0, eq)).replace(/_/g, '-');
}

/** The flags of HEAP_FLAGS that `execArgv` lacks (a flag given by the operator wins). */
export function missingHeapFlags(execArgv: readonly string[]): string[] {
  const given = new Set(execArgv.map(flagName));
  return HEAP_FLAGS.filter((f) => !given.has(flagName(f)));
}

/**
 * Executes this process again with the missing heap flags; returns only when none are
 * missing (null) or the exec failed (why, for the log: the gateway runs on without them).
 */
export function reexecWithHeapFlags(): string | null {
  const missing = missingHeapFlags(process.execArgv);
  if (missing.length === 0) return null;
  const args = [process.execPath, ...process.execArgv, ...missing, ...process.argv.slice(1)];
  try {
    return native.reexec(process.execPath, args);
  } catch (err) {
    return `running with V8's default heap settings: ${(err as Error).message}`;
  }
}
