// Starts the real gateway process (bin/blockgate serve) on a fresh data
// directory with a Unix NBD socket, for tests that drive it with real
// clients. Every start is bounded in time; stop() and kill() reap it.

import { ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { run, RunResult } from './run';

export const ROOT = path.resolve(__dirname, '..', '..', '..');
export const BIN = path.join(ROOT, 'bin', 'blockgate');

export interface GatewayOptions {
  /** Reuse a data directory (a restart); otherwise a fresh temporary one. */
  dataDir?: string;
  /** Extra --listen addresses besides the Unix socket. */
  listen?: string[];
  env?: NodeJS.ProcessEnv;
  /** More `serve` arguments. */
  args?: string[];
  /** Node's own options, before the script. */
  nodeArgs?: string[];
}

/** Log lines shown when a gateway exits on its own (a crash a test did not cause). */
const TAIL_LINES = 40;

export class Gateway {
  private stderr = '';
  /** Set once the test stops or kills it: any other exit is reported with the log's tail. */
  private stopping = false;
  private exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;

  private constructor(
    readonly dataDir: string,
    readonly socket: string,
    readonly proc: ChildProcess,
  ) {
    proc.stderr!.on('data', (c: Buffer) => (this.stderr += c.toString()));
    // 'close', not 'exit': only then has all of stderr been read.
    this.exited = new Promise((resolve) => proc.on('close', (code, signal) => resolve({ code, signal })));
    void this.exited.then(({ code, signal }) => {
      if (this.stopping) return;
      const tail = this.stderr.trimEnd().split('\n').slice(-TAIL_LINES).join('\n');
      process.stderr.write(
        `gateway ${proc.pid} (${dataDir}) exited by itself: code ${code}, signal ${signal}; its last log lines:\n${tail}\n`,
      );
    });
  }

  static async start(opts: GatewayOptions = {}): Promise<Gateway> {
    const dataDir = opts.dataDir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'blockgate-test-'));
    const socket = path.join(dataDir, 'nbd.sock');
    const listen = [`unix:${socket}`, ...(opts.listen ?? [])].flatMap((a) => ['--listen', a]);
    const proc = spawn(
      process.execPath,
      [...(opts.nodeArgs ?? []), BIN, 'serve', '--data', dataDir, ...listen, ...(opts.args ?? [])],
      {
        env: { ...process.env, ...opts.env },
        stdio: ['ignore', 'ignore', 'pipe'],
      },
    );
    const gw = new Gateway(dataDir, socket, proc);
    await gw.waitForLog(/ ready: /, 15_000);
    return gw;
  }

  get log(): string {
    return this.stderr;
  }

  /** nbd+unix URI of an export, for libnbd tools and qemu. */
  uri(exportName = 'disk0'): string {
    return `nbd+unix:///${exportName}?socket=${this.socket}`;
  }

  /** Runs the blockgate CLI against this gateway. */
  cli(...args: string[]): Promise<RunResult> {
    return run(process.execPath, [BIN, '--data', this.dataDir, ...args], { timeoutMs: 30_000 });
  }

  /** Resolves when the log matches, or rejects after `timeoutMs` or if the gateway exits. */
  waitForLog(pattern: RegExp, timeoutMs = 10_000): Promise<void> {
    return new Promise((resolve, reject) => {
      const deadline = Date.now() + timeoutMs;
      const poll = (): void => {
        if (pattern.test(this.stderr)) return resolve();
        if (this.proc.exitCode !== null || this.proc.signalCode !== null) {
          return reject(new Error(`gateway exited before ${pattern}:\n${this.stderr}`));
        }
        if (Date.now() > deadline)
          return reject(new Error(`timed out waiting for ${pattern}:\n${this.stderr}`));
        setTimeout(poll, 20);
      };
      poll();
    });
  }

  /** Polite stop (SIGTERM); resolves with the exit status. */
  async stop(
    signal: NodeJS.Signals = 'SIGTERM',
  ): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    this.stopping = true;
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill(signal);
    const timer = setTimeout(() => this.proc.kill('SIGKILL'), 15_000);
    const status = await this.exited;
    clearTimeout(timer);
    return status;
  }

  /** SIGKILL, as a crash would. */
  async kill(): Promise<void> {
    await this.stop('SIGKILL');
  }

  /** Stops the gateway and removes its data directory. */
  async destroy(): Promise<void> {
    await this.stop();
    fs.rmSync(this.dataDir, { recursive: true, force: true });
  }
}
