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

/**
 * CPU microseconds per unit of work: `cpu` seconds over a run that went at `rate` units
 * per second (fio's rate, after its ramp) for `seconds` (ramp included: it ran at about
 * the same rate).
 */
export function cpuPerUnitUs(cpu: number, rate: number, seconds: number): number {
  return (cpu * 1e6) / (rate * seconds);
}

/** A CPU figure per 4 KiB op (in µs) or per MB (in ms); a dash where /proc could not say. */
export function formatCpu(us: number | undefined, per: 'op' | 'MB'): string {
  if (us === undefined || !Number.isFinite(us)) return '—';
  return per === 'op' ? `${us.toFixed(1)} µs` : `${(us / 1000).toFixed(2)} ms`;
}
