// The V8 heap settings the gateway process runs with. V8 reads them once, as
// the heap is made (v8.setFlagsFromString is too late by then), and Node
// takes --initial-old-space-size only on its own command line (NODE_OPTIONS
// refuses it), so `serve` executes itself again with them: execv keeps the
// process id, so a supervisor's or a test's signal still reaches the gateway,
// and the stdio stays as it was.
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

/**
 * Set in the environment across the exec: a second start that still lacks the flags
 * (a Node that drops them from execArgv) runs on instead of executing itself forever.
 */
export const REEXEC_MARK = 'BLOCKGATE_HEAP_REEXEC';

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
 * Why this process must not execute itself again, or null. Under the inspector a new
 * process would drop the debugger's session (and --inspect-brk stop twice). Under
 * --cpu-prof or --prof, V8's sampler signals the main thread with SIGPROF: one pending
 * at the exec survives it while the handler does not, and kills the new program
 * ("Profiling timer expired", seen 2026-11-26). A child forked with an IPC channel
 * would lose the channel (Node removes NODE_CHANNEL_FD).
 */
export function reexecBlocker(
  execArgv: readonly string[],
  env: NodeJS.ProcessEnv,
  hasChannel: boolean,
): string | null {
  if (env[REEXEC_MARK] !== undefined) return 'they were lost across the re-execution';
  // NODE_OPTIONS holds flags too (not in execArgv), and may set either.
  const flags = [...execArgv, ...(env.NODE_OPTIONS ?? '').split(/\s+/)];
  if (flags.some((a) => a.startsWith('--inspect'))) return 'not re-executing under the inspector';
  if (flags.some((a) => a === '--prof' || a === '--cpu-prof'))
    return 'not re-executing under a CPU profiler (give node the flags to profile with them)';
  if (hasChannel) return 'not re-executing a process started with an IPC channel';
  return null;
}

/**
 * Executes this process again with the missing heap flags. Returns null when none are
 * missing; else, when it may not or the exec failed, why (for the log: the gateway
 * runs on with V8's defaults).
 */
export function reexecWithHeapFlags(): string | null {
  const missing = missingHeapFlags(process.execArgv);
  const blocker = reexecBlocker(process.execArgv, process.env, process.channel !== undefined);
  // Not handed on to whatever this gateway starts.
  delete process.env[REEXEC_MARK];
  if (missing.length === 0) return null;
  const without = `running without ${missing.join(' ')}`;
  if (blocker) return `${without}: ${blocker}`;
  const args = [process.execPath, ...process.execArgv, ...missing, ...process.argv.slice(1)];
  process.env[REEXEC_MARK] = '1';
  try {
    return native.reexec(process.execPath, args);
  } catch (err) {
    delete process.env[REEXEC_MARK];
    return `${without}: ${(err as Error).message}`;
  }
}
