// The `blockgate` command: `serve` runs the gateway; everything else is a
// request to a running gateway over its admin socket.

import type { MirrorStatus, VerifyReport } from '../replication/mirror';
import fs from 'node:fs';
import path from 'node:path';
import { callGateway } from '../control/admin-client';
import { BlockgateError } from '../errors';
import { parseListenAddress } from '../nbd/listen-address';
import { serve } from '../serve';
import type { StoreStats } from '../store/dedup-store';
import { FsckReport, fsckStore } from '../store/fsck';
import { DataDirLock } from '../util/data-lock';
import type { MaterializeReport, ReplicaListing, VolumeInfo } from '../volume/manager';
import type { SnapshotInfo } from '../volume/snapshots';
import type { SeedExportReport, SeedImportReport } from '../volume/seeds';
import { parseSize } from '../util/size';
import { parseArgs, Parsed, UsageError } from './args';
import { bytes, keyValues, table } from './format';

const DEFAULT_DATA = './blockgate-data';
const DEFAULT_LISTEN = '127.0.0.1:10809';

const USAGE = `usage:
  blockgate serve [--data DIR] [--listen ADDR]... [--admin PATH] [--hash-pool SIZE|off]
                  [--meta-cache SIZE|off]
                  [--cluster-key FILE [--replication-listen HOST:PORT]] [--mirror-timeout SEC]
                  [--mirror-buffer SIZE] [--materialize-above READS [--materialize-every SEC]]
  blockgate [--admin PATH | --data DIR] COMMAND ...
commands:
  volume create NAME --size SIZE [--backend dedup|raw|memory] [--read-only] [--path FILE|DEVICE]
  volume list [--json]
  volume info NAME [--json]
  volume delete NAME
  volume resize NAME --size SIZE
  stats [--json]
  compact [--json]                (reclaim dedup space now instead of in the background)
  similarity [--json]             (share of common content for each pair of dedup volumes)
  replica add VOL --to HOST:PORT [--mode sync|async] [--dr] [--max-rate RATE] [--seeded]
                  [--cutover [--threshold SIZE]]
                                  (mirror a dedup volume to another gateway; hash-first sync;
                                   --dr: the disaster-recovery site, fed first; RATE: bytes/s
                                   of sync traffic, e.g. 50M; --seeded: the replica was imported
                                   from this volume's last seed export, send what changed since;
                                   --cutover: once in sync with at most SIZE (default 64M) owed,
                                   hold writes, let the replica catch up and promote itself,
                                   and become its replica)
  replica list VOL [--json]       (state, lag and sync progress of each replica)
  replica remove VOL HOST:PORT
  promote VOL                     (a replica becomes the primary, one generation up)
  verify VOL [--scrub] [--json]   (compare a primary with its replicas by content ids; --scrub also reads
                                   every block back on both sides and mends damaged ones from the other
                                   side; exit 1 on a difference or damage)
  demote VOL                      (a primary becomes a replica; its contents are kept as VOL.gN)
  snapshot create VOL SNAP        (crash-consistent point in time; read-only export VOL@SNAP)
  snapshot list VOL [--json]
  snapshot delete VOL SNAP
  rollback VOL SNAP               (the volume reads as the snapshot again; no clients connected)
  clone SRC[@SNAP] NEW            (a writable volume sharing every block; without @SNAP a
                                   snapshot clone-NEW is taken for it)
  diff VOL SNAP_A [SNAP_B] [--json]
                                  (byte ranges that differ between two snapshots, or between
                                   a snapshot and the volume now)
  seed export VOL --to PATH [--to PATH2 ...]
                                  (the volume's contents to portable media, striped with parity
                                   over several files; later writes are tracked)
  seed import PATH... --as VOL [--force]
                                  (a replica-to-be from a seed bundle; then on the source:
                                   replica add VOL --to HOST:PORT --seeded)
  materialize VOL [--json]        (rewrite a dedup volume's blocks in order: fast cold sequential reads)
  fsck --data DIR [--json]        (offline: the gateway must be stopped)
--hash-pool: dedup writes of at least SIZE (default 256K) are hashed and compressed on
  worker threads; off keeps all of it on the event loop.
--meta-cache: memory for the dedup metamap held in RAM (default 128M, about 28 GiB of
  volume blocks); past it, pages are evicted and reloaded from the index.
--materialize-above: rewrite (materialize) the dedup volume most fragmented past READS
  reads per MiB of cold sequential read, one per check (every 600 s by default).
ADDR is HOST:PORT or unix:PATH (default ${DEFAULT_LISTEN}); SIZE takes K, M, G, T (binary).
`;

const SPEC = {
  flags: ['json', 'read-only', 'help', 'dr', 'seeded', 'force', 'cutover', 'scrub'],
  values: [
    'admin',
    'data',
    'size',
    'backend',
    'path',
    'hash-pool',
    'meta-cache',
    'replication-listen',
    'cluster-key',
    'mirror-timeout',
    'mirror-buffer',
    'mode',
    'max-rate',
    'materialize-above',
    'materialize-every',
    'as',
    'threshold',
  ],
  repeatable: ['listen', 'to'],
};

function adminPath(p: Parsed): string {
  const explicit = p.values.get('admin');
  if (explicit) return explicit;
  return path.join(p.values.get('data') ?? DEFAULT_DATA, 'admin.sock');
}

function expectPositionals(p: Parsed, count: number, usage: string): void {
  if (p.positionals.length < count) throw new UsageError(`missing argument: ${usage}`);
  if (p.positionals.length > count) {
    throw new UsageError(`unexpected argument '${p.positionals[count]}': ${usage}`);
  }
}

function onlyOptions(p: Parsed, allowed: string[]): void {
  const given = [...p.flags, ...p.values.keys(), ...p.repeated.keys()];
  const global = ['admin', 'data'];
  for (const o of given) {
    if (!allowed.includes(o) && !global.includes(o)) throw new UsageError(`--${o} does not apply here`);
  }
}

function print(p: Parsed, result: unknown, human: (r: never) => string): void {
  process.stdout.write(p.flags.has('json') ? JSON.stringify(result, null, 2) + '\n' : human(result as never));
}

function volumeRow(v: VolumeInfo): string[] {
  return [
    v.name,
    bytes(v.size),
    v.backend,
    v.readOnly ? 'ro' : 'rw',
    bytes(v.allocatedBytes),
    String(v.clients),
  ];
}

async function replicaCommand(p: Parsed): Promise<void> {
  const sub = p.positionals[1];
  const sock = adminPath(p);
  switch (sub) {
    case 'add': {
      expectPositionals(
        p,
        3,
        'replica add VOL --to HOST:PORT [--mode sync|async] [--dr] [--max-rate RATE] [--seeded] [--cutover [--threshold SIZE]]',
      );
      onlyOptions(p, ['to', 'mode', 'dr', 'max-rate', 'seeded', 'cutover', 'threshold', 'json']);
      const tos = p.repeated.get('to') ?? [];
      if (tos.length > 1) throw new UsageError('--to given twice');
      const to = tos[0];
      if (to === undefined) throw new UsageError('replica add needs --to HOST:PORT');
      const mode = p.values.get('mode') ?? 'async';
      if (mode !== 'sync' && mode !== 'async') throw new UsageError(`--mode ${mode}: use sync or async`);
      const rate = p.values.get('max-rate');
      const r = (await callGateway(sock, 'replica.add', {
        name: p.positionals[2],
        to,
        mode,
        dr: p.flags.has('dr'),
        seeded: p.flags.has('seeded'),
        cutover: p.flags.has('cutover'),
        ...(p.values.has('threshold') ? { threshold: parseSize(p.values.get('threshold')!) } : {}),
        ...(rate !== undefined ? { maxRate: parseSize(rate) } : {}),
      })) as MirrorStatus;
      return print(
        p,
        r,
        (x: MirrorStatus) => `${x.mode} replica ${x.to} of ${p.positionals[2]} added: ${x.state}\n`,
      );
    }
    case 'list': {
      expectPositionals(p, 3, 'replica list VOL');
      onlyOptions(p, ['json']);
      const r = (await callGateway(sock, 'replica.list', { name: p.positionals[2] })) as ReplicaListing;
      return print(p, r, (x: typeof r) =>
        x.splitBrain
          ? `${x.volume}: SPLIT BRAIN: gateway ${x.splitBrain.peer} holds it at generation ${x.splitBrain.generation}, this copy is at ${x.generation}; writes refused until 'blockgate demote ${x.volume}'\n`
          : x.role === 'replica'
            ? `${x.volume} is a replica of gateway ${x.primary} (generation ${x.generation})\n`
            : x.replicas.length === 0
              ? `${x.volume} has no replicas\n`
              : table(
                  ['REPLICA', 'MODE', 'STATE', 'LAG', 'LAG (s)', 'SYNC', 'LAST ACK', 'SENT'],
                  x.replicas.map((m) => [
                    m.to,
                    m.dr ? `${m.mode} DR` : m.mode,
                    m.heldWriters ? `${m.state} (writes held: ${m.heldWriters})` : m.state,
                    bytes(m.lagBytes),
                    m.lagSeconds.toFixed(1),
                    m.sync.totalChunks
                      ? `${(100 * (1 - m.sync.remainingChunks / m.sync.totalChunks)).toFixed(0)}%`
                      : '-',
                    m.lastAckAt ?? '-',
                    bytes(m.sentBytes),
                  ]),
                ),
      );
    }
    case 'remove': {
      expectPositionals(p, 4, 'replica remove VOL HOST:PORT');
      onlyOptions(p, ['json']);
      const r = await callGateway(sock, 'replica.remove', { name: p.positionals[2], to: p.positionals[3] });
      return print(p, r, () => `replica ${p.positionals[3]} of ${p.positionals[2]} removed\n`);
    }
    default:
      throw new UsageError(`unknown replica command '${sub ?? ''}': use add, list or remove`);
  }
}

/** A serve option's SIZE; a malformed one is a usage error naming the option. */
function sizeOption(name: string, value: string): number {
  try {
    return parseSize(value);
  } catch (err) {
    throw new UsageError(`--${name}: ${(err as Error).message}`);
  }
}

/** serve's --materialize-above READS and --materialize-every SEC. */
function materializeOptions(p: Parsed): { materializeAbove?: number; materializeEveryMs?: number } {
  const above = p.values.get('materialize-above');
  const every = p.values.get('materialize-every');
  if (above === undefined) {
    if (every !== undefined) throw new UsageError('--materialize-every needs --materialize-above');
    return {};
  }
  const reads = Number(above);
  if (!(reads >= 1 && reads <= 256))
    throw new UsageError(
      '--materialize-above takes reads per MiB, from 1 to 256 (1 is a perfectly laid out volume)',
    );
  if (every === undefined) return { materializeAbove: reads };
  const sec = Number(every);
  if (!(sec >= 1 && sec <= 86400)) throw new UsageError('--materialize-every takes seconds, from 1 to 86400');
  return { materializeAbove: reads, materializeEveryMs: Math.round(sec * 1000) };
}

async function seedCommand(p: Parsed): Promise<void> {
  const sub = p.positionals[1];
  const sock = adminPath(p);
  switch (sub) {
    case 'export': {
      expectPositionals(p, 3, 'seed export VOL --to PATH [--to PATH2 ...]');
      onlyOptions(p, ['to', 'json']);
      const to = (p.repeated.get('to') ?? []).map((f) => path.resolve(f));
      if (to.length === 0) throw new UsageError('seed export needs --to PATH (one per device)');
      const r = (await callGateway(sock, 'seed.export', { name: p.positionals[2], to })) as SeedExportReport;
      return print(
        p,
        r,
        (x: SeedExportReport) =>
          `seed bundle ${x.bundleId} of ${x.volume} written (${bytes(x.streamBytes)}, ${x.uniqueBlocks} blocks` +
          `${x.paths.length > 1 ? `, striped over ${x.paths.length} files with parity` : ''}); ` +
          `writes since are tracked by snapshot ${x.snapshot}\n`,
      );
    }
    case 'import': {
      if (p.positionals.length < 3)
        throw new UsageError('missing argument: seed import PATH... --as VOL [--force]');
      onlyOptions(p, ['as', 'force', 'json']);
      const as = p.values.get('as');
      if (as === undefined) throw new UsageError('seed import needs --as VOL');
      const r = (await callGateway(sock, 'seed.import', {
        from: p.positionals.slice(2).map((f) => path.resolve(f)),
        as,
        force: p.flags.has('force'),
      })) as SeedImportReport;
      return print(
        p,
        r,
        (x: SeedImportReport) =>
          `volume ${x.volume} imported from seed ${x.bundleId} (${x.source.volume} of gateway ${x.source.gateway}, ` +
          `${bytes(x.size)}, ${x.uniqueBlocks} blocks)${x.repaired.length ? `; rebuilt from parity: ${x.repaired.join(', ')}` : ''}\n`,
      );
    }
    default:
      throw new UsageError(`unknown seed command '${sub ?? ''}': use export or import`);
  }
}

async function snapshotCommand(p: Parsed): Promise<void> {
  const sub = p.positionals[1];
  const sock = adminPath(p);
  switch (sub) {
    case 'create': {
      expectPositionals(p, 4, 'snapshot create VOL SNAP');
      onlyOptions(p, ['json']);
      const r = (await callGateway(sock, 'snapshot.create', {
        name: p.positionals[2],
        snapshot: p.positionals[3],
      })) as SnapshotInfo & { barrierMs: number };
      return print(
        p,
        r,
        (x: typeof r) =>
          `snapshot ${x.export} taken (${bytes(x.size)}; writes held for ${x.barrierMs.toFixed(1)} ms)\n`,
      );
    }
    case 'list': {
      expectPositionals(p, 3, 'snapshot list VOL');
      onlyOptions(p, ['json']);
      const l = (await callGateway(sock, 'snapshot.list', { name: p.positionals[2] })) as SnapshotInfo[];
      return print(p, l, (x: SnapshotInfo[]) =>
        x.length
          ? table(
              ['NAME', 'EXPORT', 'SIZE', 'CREATED', 'CLONES', 'CLIENTS'],
              x.map((s) => [
                s.name,
                s.export,
                bytes(s.size),
                s.created,
                s.clones.join(',') || '-',
                String(s.clients),
              ]),
            )
          : `volume ${p.positionals[2]} has no snapshots\n`,
      );
    }
    case 'delete': {
      expectPositionals(p, 4, 'snapshot delete VOL SNAP');
      onlyOptions(p, ['json']);
      const r = await callGateway(sock, 'snapshot.delete', {
        name: p.positionals[2],
        snapshot: p.positionals[3],
      });
      return print(p, r, () => `deleted snapshot ${p.positionals[2]}@${p.positionals[3]}\n`);
    }
    default:
      throw new UsageError(`unknown snapshot command '${sub ?? ''}': use create, list or delete`);
  }
}

async function volumeCommand(p: Parsed): Promise<void> {
  const sub = p.positionals[1];
  const sock = adminPath(p);
  switch (sub) {
    case 'create': {
      expectPositionals(p, 3, 'volume create NAME --size SIZE');
      onlyOptions(p, ['size', 'backend', 'read-only', 'path', 'json']);
      const size = p.values.get('size');
      const info = (await callGateway(sock, 'volume.create', {
        name: p.positionals[2],
        ...(size !== undefined ? { size: parseSize(size) } : {}),
        ...(p.values.has('backend') ? { backend: p.values.get('backend') } : {}),
        ...(p.values.has('path') ? { path: path.resolve(p.values.get('path')!) } : {}),
        readOnly: p.flags.has('read-only'),
      })) as VolumeInfo;
      return print(p, info, (v: VolumeInfo) => `created volume ${v.name} (${bytes(v.size)}, ${v.backend})\n`);
    }
    case 'list': {
      expectPositionals(p, 2, 'volume list');
      onlyOptions(p, ['json']);
      const list = await callGateway(sock, 'volume.list');
      return print(p, list, (l: VolumeInfo[]) =>
        table(['NAME', 'SIZE', 'BACKEND', 'MODE', 'ALLOCATED', 'CLIENTS'], l.map(volumeRow)),
      );
    }
    case 'info': {
      expectPositionals(p, 3, 'volume info NAME');
      onlyOptions(p, ['json']);
      const info = await callGateway(sock, 'volume.info', { name: p.positionals[2] });
      return print(p, info, (v: VolumeInfo) =>
        keyValues([
          ['name', v.name],
          ['size', `${bytes(v.size)} (${v.size} bytes)`],
          ['backend', v.backend],
          ['mode', v.readOnly ? 'read-only' : 'read-write'],
          ...(v.path ? [['path', v.path] as [string, string]] : []),
          ['allocated', bytes(v.allocatedBytes)],
          ['clients', String(v.clients)],
          ['created', v.created],
          ...(v.cloneOf ? [['clone of', v.cloneOf] as [string, string]] : []),
          ...(v.snapshots ? [['snapshots', String(v.snapshots)] as [string, string]] : []),
          ...(v.dedup
            ? ([
                ['logical', bytes(v.dedup.logicalBytes)],
                ['zero blocks', String(v.dedup.zeroBlocks)],
                ['exclusive', `${bytes(v.dedup.exclusiveBytes)} (stored for this volume alone)`],
                [
                  'fragmentation',
                  `${v.dedup.fragmentation.toFixed(1)} reads per MiB of cold sequential read (1 is ideal)`,
                ],
              ] as Array<[string, string]>)
            : []),
        ]),
      );
    }
    case 'delete': {
      expectPositionals(p, 3, 'volume delete NAME');
      onlyOptions(p, ['json']);
      const r = await callGateway(sock, 'volume.delete', { name: p.positionals[2] });
      return print(p, r, () => `deleted volume ${p.positionals[2]}\n`);
    }
    case 'resize': {
      expectPositionals(p, 3, 'volume resize NAME --size SIZE');
      onlyOptions(p, ['size', 'json']);
      const size = p.values.get('size');
      if (size === undefined) throw new UsageError('volume resize needs --size SIZE');
      const info = await callGateway(sock, 'volume.resize', {
        name: p.positionals[2],
        size: parseSize(size),
      });
      return print(p, info, (v: VolumeInfo) => `volume ${v.name} is now ${bytes(v.size)}\n`);
    }
    default:
      throw new UsageError(
        sub
          ? `unknown volume command '${sub}'`
          : 'volume needs a command: create, list, info, delete, resize',
      );
  }
}

interface Stats {
  volumes: number;
  connections: number;
  logicalBytes: number;
  allocatedBytes: number;
  rssBytes: number;
  heapUsedBytes: number;
  uptimeSeconds: number;
  listeners: string[];
  dedup: StoreStats | null;
}

async function fsckCommand(p: Parsed): Promise<void> {
  expectPositionals(p, 1, 'fsck --data DIR');
  onlyOptions(p, ['json']);
  const dataDir = p.values.get('data');
  if (!dataDir) throw new UsageError('fsck needs --data DIR');
  if (!fs.existsSync(path.join(dataDir, 'volumes.json')))
    throw new UsageError(`${dataDir} is not a blockgate data directory`);
  // Holding the gateway's lock proves no gateway is changing the store under the check.
  const lock = DataDirLock.acquire(dataDir);
  try {
    const storeDir = path.join(dataDir, 'store');
    if (!fs.existsSync(path.join(storeDir, 'index'))) {
      print(p, { store: false, problems: [] }, () => 'no dedup store here: nothing to check\n');
      return;
    }
    const r = fsckStore(storeDir);
    print(p, { store: true, ...r }, (x: FsckReport) =>
      [
        `checked ${x.volumes} volume(s): ${x.metaEntries} metamap entries (${x.zeroBlocks} zero), ` +
          `${x.dataBlocks} stored blocks`,
        `segments ${bytes(x.segmentBytes)}: live ${bytes(x.liveBytes)}, orphaned ${bytes(x.orphanedBytes)}` +
          (x.spareBytes ? `; spare files ${bytes(x.spareBytes)}` : ''),
        ...x.problems.map((m) => `problem: ${m}`),
        x.problems.length
          ? `${x.problems.length} inconsistenc${x.problems.length === 1 ? 'y' : 'ies'} found`
          : 'clean',
        '',
      ].join('\n'),
    );
    if (r.problems.length) process.exitCode = 1;
  } finally {
    lock.release();
  }
}

async function main(argv: string[]): Promise<void> {
  const p = parseArgs(argv, SPEC);
  const command = p.positionals[0];
  if (p.flags.has('help') || command === 'help') {
    process.stdout.write(USAGE);
    return;
  }
  switch (command) {
    case 'serve': {
      expectPositionals(p, 1, 'serve');
      onlyOptions(p, [
        'listen',
        'hash-pool',
        'meta-cache',
        'replication-listen',
        'cluster-key',
        'mirror-timeout',
        'mirror-buffer',
        'materialize-above',
        'materialize-every',
      ]);
      const dataDir = p.values.get('data') ?? DEFAULT_DATA;
      const listen = (p.repeated.get('listen') ?? [DEFAULT_LISTEN]).map((a) => {
        try {
          return parseListenAddress(a);
        } catch (err) {
          throw new UsageError(`--listen: ${(err as Error).message}`);
        }
      });
      const pool = p.values.get('hash-pool');
      const metaCache = p.values.get('meta-cache');
      const replicationListen = p.values.get('replication-listen');
      const clusterKeyFile = p.values.get('cluster-key');
      let replication: { host: string; port: number } | undefined;
      if (replicationListen !== undefined) {
        let addr;
        try {
          addr = parseListenAddress(replicationListen);
        } catch (err) {
          throw new UsageError(`--replication-listen: ${(err as Error).message}`);
        }
        if (addr.kind !== 'tcp') throw new UsageError('--replication-listen takes HOST:PORT (TCP)');
        if (clusterKeyFile === undefined)
          throw new UsageError(
            '--replication-listen needs --cluster-key FILE: links are refused without a shared key',
          );
        replication = { host: addr.host, port: addr.port };
      }
      const mirrorTimeout = p.values.get('mirror-timeout');
      let mirrorTimeoutMs: number | undefined;
      if (mirrorTimeout !== undefined) {
        const sec = Number(mirrorTimeout);
        if (!(sec > 0 && sec <= 3600)) throw new UsageError('--mirror-timeout takes seconds, from 0 to 3600');
        mirrorTimeoutMs = Math.round(sec * 1000);
      }
      const mirrorBuffer = p.values.get('mirror-buffer');
      let mirrorBufferBytes: number | undefined;
      if (mirrorBuffer !== undefined) {
        mirrorBufferBytes = sizeOption('mirror-buffer', mirrorBuffer);
        if (mirrorBufferBytes < 4096) throw new UsageError('--mirror-buffer takes a size of at least 4K');
      }
      return serve({
        dataDir,
        listen,
        adminPath: p.values.get('admin') ?? path.join(dataDir, 'admin.sock'),
        ...(pool !== undefined ? { hashPoolMin: pool === 'off' ? null : sizeOption('hash-pool', pool) } : {}),
        ...(metaCache !== undefined
          ? { metaCacheBytes: metaCache === 'off' ? 0 : sizeOption('meta-cache', metaCache) }
          : {}),
        ...(replication ? { replicationListen: replication } : {}),
        ...(clusterKeyFile !== undefined ? { clusterKeyFile } : {}),
        ...(mirrorTimeoutMs !== undefined ? { mirrorTimeoutMs } : {}),
        ...(mirrorBufferBytes !== undefined ? { mirrorBufferBytes } : {}),
        ...materializeOptions(p),
      });
    }
    case 'volume':
      return volumeCommand(p);
    case 'snapshot':
      return snapshotCommand(p);
    case 'seed':
      return seedCommand(p);
    case 'materialize': {
      expectPositionals(p, 2, 'materialize VOL');
      onlyOptions(p, ['json']);
      const r = (await callGateway(adminPath(p), 'materialize', {
        name: p.positionals[1],
      })) as MaterializeReport;
      return print(
        p,
        r,
        (x: typeof r) =>
          `${x.volume}: ${x.before.toFixed(1)} -> ${x.after.toFixed(1)} reads per MiB of sequential read; ` +
          `${x.movedBlocks} blocks (${bytes(x.movedBytes)}) rewritten in ${(x.ms / 1000).toFixed(1)} s\n`,
      );
    }
    case 'rollback': {
      expectPositionals(p, 3, 'rollback VOL SNAP');
      onlyOptions(p, ['json']);
      const r = (await callGateway(adminPath(p), 'rollback', {
        name: p.positionals[1],
        snapshot: p.positionals[2],
      })) as { volume: string; snapshot: string; changedBlocks: number };
      return print(
        p,
        r,
        (x: typeof r) => `${x.volume} rolled back to ${x.snapshot} (${x.changedBlocks} block(s) changed back)
`,
      );
    }
    case 'clone': {
      expectPositionals(p, 3, 'clone SRC[@SNAP] NEW');
      onlyOptions(p, ['json']);
      const src = p.positionals[1]!;
      const at = src.indexOf('@');
      const r = (await callGateway(adminPath(p), 'clone', {
        source: at < 0 ? src : src.slice(0, at),
        ...(at < 0 ? {} : { snapshot: src.slice(at + 1) }),
        name: p.positionals[2],
      })) as VolumeInfo & { cloneOf: string; ms: number };
      return print(
        p,
        r,
        (
          x: typeof r,
        ) => `created volume ${x.name} (${bytes(x.size)}), a clone of ${x.cloneOf}, in ${x.ms.toFixed(0)} ms
`,
      );
    }
    case 'diff': {
      if (p.positionals.length < 3 || p.positionals.length > 4)
        throw new UsageError(
          p.positionals.length < 3
            ? 'missing argument: diff VOL SNAP_A [SNAP_B]'
            : `unexpected argument '${p.positionals[4]}': diff VOL SNAP_A [SNAP_B]`,
        );
      onlyOptions(p, ['json']);
      const r = (await callGateway(adminPath(p), 'diff', {
        name: p.positionals[1],
        from: p.positionals[2],
        ...(p.positionals[3] !== undefined ? { to: p.positionals[3] } : {}),
      })) as {
        from: string;
        to: string;
        ranges: Array<{ offset: number; length: number; zero: boolean }>;
        changedBytes: number;
      };
      return print(p, r, (x: typeof r) =>
        x.ranges.length === 0
          ? `${x.from} and ${x.to} hold the same content\n`
          : `${x.ranges.length} range(s), ${bytes(x.changedBytes)} differ between ${x.from} and ${x.to}:\n` +
            table(
              ['OFFSET', 'LENGTH', 'NOW'],
              x.ranges.map((g) => [String(g.offset), String(g.length), g.zero ? 'zero' : 'data']),
            ),
      );
    }
    case 'replica':
      return replicaCommand(p);
    case 'promote': {
      expectPositionals(p, 2, 'promote VOL');
      onlyOptions(p, ['json']);
      const r = (await callGateway(adminPath(p), 'promote', { name: p.positionals[1] })) as {
        name: string;
        generation: number;
      };
      return print(p, r, (x: typeof r) => `${x.name} is the primary now, at generation ${x.generation}\n`);
    }
    case 'verify': {
      expectPositionals(p, 2, 'verify VOL');
      onlyOptions(p, ['json', 'scrub']);
      const r = (await callGateway(adminPath(p), 'verify', {
        name: p.positionals[1],
        scrub: p.flags.has('scrub'),
      })) as {
        volume: string;
        replicas: VerifyReport[];
        damaged?: Array<{ offset: number; length: number }>;
        mended?: Array<{ offset: number; length: number }>;
      };
      const differ = r.replicas.some((x) => x.mismatched.length > 0 || (x.damaged?.length ?? 0) > 0);
      if (differ || (r.damaged?.length ?? 0) > 0) process.exitCode = 1;
      const list = (ranges: Array<{ offset: number; length: number }>): string =>
        ranges.map((g) => `  offset ${g.offset} length ${g.length}\n`).join('');
      return print(
        p,
        r,
        (x: typeof r) =>
          (x.damaged === undefined
            ? ''
            : x.damaged.length === 0
              ? 'this copy: every block reads back as its content id\n'
              : `this copy: ${x.damaged.length} damaged range(s):\n${list(x.damaged)}` +
                (x.mended?.length
                  ? `this copy: ${x.mended.length} range(s) mended from a replica:\n${list(x.mended)}`
                  : 'this copy: none mended (no replica in sync gave matching bytes): reads of them fail (EIO)\n')) +
          x.replicas
            .map(
              (m) =>
                (m.mismatched.length === 0
                  ? `${m.to}: same content (${m.chunks} chunks compared, replica ${m.state})\n`
                  : `${m.to}: ${m.mismatched.length} range(s) differ (replica ${m.state}):\n${list(m.mismatched)}`) +
                (m.damaged === undefined
                  ? ''
                  : m.damaged.length === 0
                    ? `${m.to}: every block reads back as its content id\n`
                    : `${m.to}: ${m.damaged.length} damaged range(s), being sent again:\n${list(m.damaged)}`),
            )
            .join(''),
      );
    }
    case 'demote': {
      expectPositionals(p, 2, 'demote VOL');
      onlyOptions(p, ['json']);
      const r = (await callGateway(adminPath(p), 'demote', { name: p.positionals[1] })) as {
        volume: string;
        kept: string;
      };
      return print(
        p,
        r,
        (x: typeof r) =>
          `${x.volume} is a replica now, waiting for its primary's mirror; its contents are kept as ${x.kept}\n`,
      );
    }
    case 'fsck':
      return fsckCommand(p);
    case 'similarity': {
      expectPositionals(p, 1, 'similarity');
      onlyOptions(p, ['json']);
      const pairs = (await callGateway(adminPath(p), 'similarity')) as Array<{
        a: string;
        b: string;
        commonBytes: number;
        similarity: number;
      }>;
      return print(p, pairs, (l: typeof pairs) =>
        l.length
          ? table(
              ['VOLUME', 'VOLUME', 'COMMON', 'SIMILARITY'],
              l.map((x) => [x.a, x.b, bytes(x.commonBytes), `${(100 * x.similarity).toFixed(1)}%`]),
            )
          : 'fewer than two dedup volumes\n',
      );
    }
    case 'compact': {
      expectPositionals(p, 1, 'compact');
      onlyOptions(p, ['json']);
      const r = (await callGateway(adminPath(p), 'compact')) as {
        segments: number;
        movedBytes: number;
        freedBytes: number;
      };
      return print(
        p,
        r,
        (x: typeof r) =>
          `compacted ${x.segments} segment(s): moved ${bytes(x.movedBytes)}, freed ${bytes(x.freedBytes)}\n`,
      );
    }
    case 'stats': {
      expectPositionals(p, 1, 'stats');
      onlyOptions(p, ['json']);
      const s = (await callGateway(adminPath(p), 'stats')) as Stats;
      return print(p, s, (x: Stats) =>
        keyValues([
          ['volumes', String(x.volumes)],
          ['connections', String(x.connections)],
          ['logical', bytes(x.logicalBytes)],
          ['allocated', bytes(x.allocatedBytes)],
          ['memory (RSS)', bytes(x.rssBytes)],
          ['uptime', `${x.uptimeSeconds} s`],
          ['listening', x.listeners.join(', ')],
          ...(x.dedup
            ? ([
                ['dedup logical', bytes(x.dedup.logicalBytes)],
                ['dedup unique', bytes(x.dedup.uniqueBytes)],
                ['dedup stored', bytes(x.dedup.storedBytes)],
                ['dedup ratio', `${x.dedup.dedupRatio.toFixed(2)}x`],
                ['compression', `${x.dedup.compressionRatio.toFixed(2)}x`],
                ['zero blocks', String(x.dedup.zeroBlocks)],
                ['collisions', String(x.dedup.collisions)],
                ['reclaimable', bytes(x.dedup.reclaimableBytes)],
                ['spare segment files', bytes(x.dedup.spareBytes)],
                ['index', `${bytes(x.dedup.indexBytes)} (${x.dedup.indexBytesPerBlock} B per stored block)`],
                ['hash index (memory)', bytes(x.dedup.hashIndexBytes)],
              ] as Array<[string, string]>)
            : []),
        ]),
      );
    }
    case undefined:
      throw new UsageError('no command given (try blockgate --help)');
    default:
      throw new UsageError(`unknown command '${command}' (try blockgate --help)`);
  }
}

main(process.argv.slice(2)).catch((err: unknown) => {
  const message = err instanceof Error ? err.message : String(err);
  process.stderr.write(`blockgate: ${message}\n`);
  if (!(err instanceof UsageError || err instanceof BlockgateError)) {
    process.stderr.write(`${(err as Error)?.stack ?? ''}\n`);
  }
  process.exit(err instanceof UsageError ? 2 : 1);
});
