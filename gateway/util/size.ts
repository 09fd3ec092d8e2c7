import { InvalidArgumentError } from '../errors';

const UNITS: Record<string, number> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40, P: 2 ** 50 };

/** Parses `512`, `64K`, `10M`, `8G`, `1T` (binary multiples; an optional `iB`/`B` is accepted). */
export function parseSize(text: string): number {
  const m = /^(\d+)([KMGTP]?)(?:i?B)?$/i.exec(text.trim());
  if (!m) throw new InvalidArgumentError(`invalid size '${text}': use a number with K, M, G or T (e.g. 10G)`);
  const value = Number(m[1]) * UNITS[m[2]!.toUpperCase()]!;
  if (!Number.isSafeInteger(value)) throw new InvalidArgumentError(`size '${text}' is too large`);
  return value;
}

export function formatSize(bytes: number): string {
  for (const unit of ['P', 'T', 'G', 'M', 'K']) {
    const n = UNITS[unit]!;
    if (bytes >= n) {
      const v = bytes / n;
      return `${Number.isInteger(v) ? v : v.toFixed(1)} ${unit}iB`;
    }
  }
  return `${bytes} B`;
}
