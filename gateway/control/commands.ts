// The admin commands: argument checking and the call into the volume
// manager. Every command's result is plain JSON, the same the CLI prints
// under --json.

import { InvalidArgumentError, UnknownCommandError } from '../errors';
import type { Backend } from '../volume/catalog';
import type { VolumeManager } from '../volume/manager';
import type { MirrorMode } from '../replication/mirror';
import { parseSize } from '../util/size';

export interface GatewayStatus {
  startedAt: number;
  listeners: string[];
}

type Args = Record<string, unknown>;
type Handler = (args: Args) => unknown;

function str(args: Args, key: string, required = true): string | undefined {
  const v = args[key];
  if (v === undefined && !required) return undefined;
  if (typeof v !== 'string' || v === '')
    throw new InvalidArgumentError(`'${key}' must be a non-empty string`);
  return v;
}

function size(args: Args, key: string, required = true): number | undefined {
  const v = args[key];
  if (v === undefined && !required) return undefined;
  if (typeof v === 'number') return v;
  if (typeof v === 'string') return parseSize(v);
  throw new InvalidArgumentError(`'${key}' must be a size such as 10G`);
}

function bool(args: Args, key: string): boolean {
  const v = args[key];
  if (v === undefined) return false;
  if (typeof v !== 'boolean') throw new InvalidArgumentError(`'${key}' must be true or false`);
  return v;
}

export function commandTable(volumes: VolumeManager, status: GatewayStatus): Map<string, Handler> {
  return new Map<string, Handler>([
    ['ping', () => ({ pid: process.pid })],
    [
      'volume.create',
      (a) =>
        volumes.create({
          name: str(a, 'name')!,
          size: size(a, 'size', false),
          backend: str(a, 'backend', false) as Backend | undefined,
          readOnly: bool(a, 'readOnly'),
          path: str(a, 'path', false),
        }),
    ],
    ['volume.list', () => volumes.listVolumes()],
    ['compact', () => volumes.compact()],
    ['similarity', () => volumes.similarity()],
    ['volume.info', (a) => volumes.info(str(a, 'name')!)],
    ['volume.delete', (a) => volumes.delete(str(a, 'name')!).then(() => ({ deleted: a.name }))],
    ['volume.resize', (a) => volumes.resize(str(a, 'name')!, size(a, 'size')!)],
    [
      'replica.add',
      (a) =>
        volumes.replicaAdd(str(a, 'name')!, str(a, 'to')!, (str(a, 'mode', false) ?? 'async') as MirrorMode, {
          dr: bool(a, 'dr'),
          seeded: bool(a, 'seeded'),
          cutover: bool(a, 'cutover'),
          ...(a['threshold'] !== undefined ? { threshold: size(a, 'threshold') } : {}),
          ...(a['maxRate'] !== undefined ? { maxRate: size(a, 'maxRate') } : {}),
        }),
    ],
    ['replica.remove', (a) => volumes.replicaRemove(str(a, 'name')!, str(a, 'to')!)],
    ['replica.list', (a) => volumes.replicaList(str(a, 'name')!)],
    ['promote', (a) => volumes.promote(str(a, 'name')!)],
    ['verify', (a) => volumes.verify(str(a, 'name')!, { scrub: bool(a, 'scrub') })],
    ['demote', (a) => volumes.demote(str(a, 'name')!)],
    ['snapshot.create', (a) => volumes.snapshotCreate(str(a, 'name')!, str(a, 'snapshot')!)],
    ['snapshot.list', (a) => volumes.snapshotList(str(a, 'name')!)],
    ['snapshot.delete', (a) => volumes.snapshotDelete(str(a, 'name')!, str(a, 'snapshot')!)],
    ['rollback', (a) => volumes.rollback(str(a, 'name')!, str(a, 'snapshot')!)],
    ['clone', (a) => volumes.clone(str(a, 'source')!, str(a, 'snapshot', false), str(a, 'name')!)],
    [
      'seed.export',
      (a) => {
        const to = a['to'];
        if (!Array.isArray(to) || !to.every((p) => typeof p === 'string' && p !== ''))
          throw new InvalidArgumentError("'to' must be a list of paths");
        return volumes.seedExport(str(a, 'name')!, to as string[]);
      },
    ],
    [
      'seed.import',
      (a) => {
        const from = a['from'];
        if (!Array.isArray(from) || !from.every((p) => typeof p === 'string' && p !== ''))
          throw new InvalidArgumentError("'from' must be a list of paths");
        return volumes.seedImport(from as string[], str(a, 'as')!, bool(a, 'force'));
      },
    ],
    ['materialize', (a) => volumes.materialize(str(a, 'name')!)],
    ['diff', (a) => volumes.diff(str(a, 'name')!, str(a, 'from')!, str(a, 'to', false))],
    [
      'stats',
      async () => {
        const list = volumes.listVolumes();
        const mem = process.memoryUsage();
        return {
          volumes: list.length,
          connections: volumes.connectionCount(),
          logicalBytes: list.reduce((n, v) => n + v.size, 0),
          allocatedBytes: list.reduce((n, v) => n + v.allocatedBytes, 0),
          rssBytes: mem.rss,
          heapUsedBytes: mem.heapUsed,
          heapTotalBytes: mem.heapTotal,
          externalBytes: mem.external,
          uptimeSeconds: Math.round((Date.now() - status.startedAt) / 1000),
          listeners: status.listeners,
          dedup: await volumes.storeStats(),
        };
      },
    ],
  ]);
}

export async function runCommand(table: Map<string, Handler>, command: string, args: Args): Promise<unknown> {
  const handler = table.get(command);
  if (!handler) throw new UnknownCommandError(`unknown command '${command}'`);
  return handler(args);
}
