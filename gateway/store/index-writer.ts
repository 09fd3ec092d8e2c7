import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { CheckpointReply, CheckpointRequest, transferList } from './checkpoint-message';

/** The main thread's handle on the index-writer worker: one checkpoint at a time. */
export class IndexWriter {
  private readonly worker: Worker;
  private seq = 0;
  private readonly waiting = new Map<number, { resolve(r: CheckpointReply): void; reject(e: Error): void }>();

  constructor(dir: string) {
    this.worker = new Worker(path.join(__dirname, 'index-writer-worker.js'), { workerData: { dir } });
    this.worker.unref();
    this.worker.on('message', (m: { seq: number; reply?: CheckpointReply; error?: string }) => {
      const w = this.waiting.get(m.seq);
      this.waiting.delete(m.seq);
      if (m.error !== undefined) w?.reject(new Error(`index writer: ${m.error}`));
      else w?.resolve(m.reply!);
    });
    this.worker.on('error', (err) => {
      for (const w of this.waiting.values()) w.reject(err);
      this.waiting.clear();
    });
  }

  commit(req: CheckpointRequest): Promise<CheckpointReply> {
    const seq = ++this.seq;
    return new Promise((resolve, reject) => {
      this.waiting.set(seq, { resolve, reject });
      // While a commit is pending the worker must keep the process alive.
      this.worker.ref();
      this.worker.postMessage({ seq, req }, transferList(req));
    }).finally(() => {
      if (this.waiting.size === 0) this.worker.unref();
    }) as Promise<CheckpointReply>;
  }

  close(): Promise<number> {
    return this.worker.terminate();
  }
}
