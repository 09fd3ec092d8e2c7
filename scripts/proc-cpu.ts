// A process's CPU time from /proc, for the benchmarks' per-operation cost figures.

import { spawnSync } from 'node:child_process';
import fs from 'node:fs';

/** Clock ticks per second of /proc's CPU times (sysconf(_SC_CLK_TCK), 100 nearly everywhere). */
const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout) || 100;

/**
 * CPU seconds a process has used so far, all threads, user and system time; NaN once it is
 * gone. On a noisy shared machine this moves less than throughput does: a change that cuts a
 * server's work per request shows here even in a run where the host stole the gain.
 */
export function cpuSeconds(pid: number): number {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name, which may itself hold spaces and parentheses.
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / CLK_TCK;
  } catch {
    return NaN;
  }
}
