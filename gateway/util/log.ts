// One line per event on stderr: time, level, subsystem, message. Operators
// grep these; tests read them to check that bad input was noticed.

export type Level = 'debug' | 'info' | 'warn' | 'error';
const RANK: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export interface Logger {
  debug(msg: string): void;
  info(msg: string): void;
  warn(msg: string): void;
  error(msg: string): void;
  child(subsystem: string): Logger;
}

function envLevel(): Level {
  const v = process.env.BLOCKGATE_LOG;
  return v === 'debug' || v === 'info' || v === 'warn' || v === 'error' ? v : 'info';
}

export function createLogger(subsystem = 'blockgate', level: Level = envLevel()): Logger {
  const min = RANK[level];
  const emit = (l: Level, msg: string): void => {
    if (RANK[l] >= min) process.stderr.write(`${new Date().toISOString()} ${l} ${subsystem}: ${msg}\n`);
  };
  return {
    debug: (m) => emit('debug', m),
    info: (m) => emit('info', m),
    warn: (m) => emit('warn', m),
    error: (m) => emit('error', m),
    child: (s) => createLogger(`${subsystem}/${s}`, level),
  };
}

/** A logger that drops everything; for unit tests of one layer. */
export const silentLogger: Logger = {
  debug() {},
  info() {},
  warn() {},
  error() {},
  child: () => silentLogger,
};
