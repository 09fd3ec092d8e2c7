import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { CheckpointReply, CheckpointRequest } from './checkpoint-message';

interface Waiter {
  resolve(r: CheckpointReply): void;
  reject(e: Error): void;
}

/**
 * The main thread's handle on the index-writer worker, one checkpoint at a time.
 * A worker that dies fails the commits it held, and the next commit starts a new
 * one: a dead writer must never leave FLUSH waiting forever.
 */
export class IndexWriter {
  private worker: Worker | null = null;
  private seq = 0;
  private readonly waiting = new Map<number, Waiter>();
  private closed = false;

  constructor(private readonly dir: string) {}

  private start(): Worker {
    const worker = new Worker(path.join(__dirname, 'index-writer-worker.js'), {
      workerData: { dir: this.dir },
    });
    worker.unref();
    worker.on('message', (m: { seq: number; reply?: CheckpointReply; error?: string }) => {
      const w = this.waiting.get(m.seq);
      this.waiting.delete(m.seq);
      if (m.error !== undefined) w?.reject(new Error(`index writer: ${m.error}`));
      else w?.resolve(m.reply!);
      if (this.waiting.size === 0) worker.unref();
    });
    const fail = (err: Error): void => {
      if (this.worker === worker) this.worker = null;
      for (const w of this.waiting.values()) w.reject(err);
      this.waiting.clear();
    };
    worker.on('error', fail);
    worker.on('exit', (code) => {
      if (!this.closed) fail(new Error(`index writer exited with code ${code}`));
    });
    return worker;
  }

  commit(req: CheckpointRequest): Promise<CheckpointReply> {
    if (this.closed) return Promise.reject(new Error('index writer is closed'));
    const worker = (this.worker ??= this.start());
    const seq = ++this.seq;
    return new Promise<CheckpointReply>((resolve, reject) => {
      this.waiting.set(seq, { resolve, reject });
      // While a commit is pending the worker must keep the process alive.
      worker.ref();
      // The tables are shared memory: posted, not copied, and left alone until the reply.
      worker.postMessage({ seq, req });
    });
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.worker?.terminate();
    this.worker = null;
  }
}
