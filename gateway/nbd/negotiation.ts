// The handshake phase of one connection: greeting, client flags, and option
// haggling until the client picks an export (GO / EXPORT_NAME), aborts, or
// breaks the protocol.

import type { Socket } from 'node:net';
import {
  BASE_ALLOCATION,
  HandshakeFlag,
  Info,
  KNOWN_CLIENT_FLAGS,
  ClientFlag,
  Opt,
  Rep,
} from '../../protocol/nbd/constants';
import { NbdProtocolError } from '../../protocol/nbd/errors';
import { HandshakeReader } from '../../protocol/nbd/framing';
import {
  decodeExportName,
  decodeInfoRequest,
  decodeMetaContextRequest,
  encodeExportNameReply,
  encodeInfo,
  encodeMetaContextReply,
  encodeOptionReply,
  encodeServerEntry,
  encodeServerGreeting,
} from '../../protocol/nbd/handshake';
import type { Logger } from '../util/log';
import { BLOCK_SIZE, transmissionFlags } from './export-flags';
import type { ExportRegistry, NbdExport } from './registry';

/** Context id under which base:allocation is selected. */
export const BASE_ALLOCATION_ID = 1;

export interface Negotiated {
  export: NbdExport;
  structuredReplies: boolean;
  /** Whether base:allocation was selected for this export. */
  baseAllocation: boolean;
  flags: number;
  /** Bytes that arrived after the final option: the first requests. */
  remainder: Buffer[];
}

const LIMITS = { maxOptionData: 64 * 1024, maxOptionDiscard: 16 * 1024 * 1024 };
const OPTION_NAMES: Record<number, string> = Object.fromEntries(Object.entries(Opt).map(([k, v]) => [v, k]));

export class Negotiation {
  private readonly reader = new HandshakeReader(LIMITS);
  private structured = false;
  private noZeroes = false;
  private fixedNewstyle = false;
  /** The last SET_META_CONTEXT: which export it named and whether base:allocation was picked. */
  private metaContext: { exportName: string; baseAllocation: boolean } | null = null;
  private finished = false;

  constructor(
    private readonly socket: Socket,
    private readonly registry: ExportRegistry,
    private readonly log: Logger,
    private readonly done: (result: Negotiated | null) => void,
  ) {}

  start(): void {
    this.socket.write(encodeServerGreeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES));
  }

  /** Feeds received bytes; returns false once negotiation has ended (either way). */
  onData(chunk: Buffer): boolean {
    if (this.finished) return false;
    this.reader.push(chunk);
    try {
      for (
        let m = this.reader.next();
        m !== null && !this.finished;
        m = this.finished ? null : this.reader.next()
      ) {
        if (m.kind === 'client-flags') this.clientFlags(m.flags);
        else if (m.kind === 'oversized-option') this.oversized(m.option, m.length);
        else this.option(m.option, m.data);
      }
    } catch (err) {
      if (!(err instanceof NbdProtocolError)) throw err;
      this.fail(`handshake: ${err.message}`);
    }
    return !this.finished;
  }

  private clientFlags(flags: number): void {
    if ((flags & ~KNOWN_CLIENT_FLAGS) !== 0) {
      return this.fail(`unknown client flags 0x${flags.toString(16)}`);
    }
    this.fixedNewstyle = (flags & ClientFlag.FIXED_NEWSTYLE) !== 0;
    this.noZeroes = (flags & ClientFlag.NO_ZEROES) !== 0;
  }

  private oversized(option: number, length: number): void {
    if (option === Opt.EXPORT_NAME) return this.fail(`NBD_OPT_EXPORT_NAME of ${length} bytes`);
    this.log.warn(`option ${optionName(option)} of ${length} bytes refused as too big`);
    this.reply(option, Rep.ERR_TOO_BIG, `option data of ${length} bytes is too big`);
  }

  private option(option: number, data: Buffer): void {
    try {
      switch (option) {
        case Opt.EXPORT_NAME:
          return this.exportName(data);
        case Opt.ABORT:
          this.reply(option, Rep.ACK);
          return this.finish(null, 'client aborted negotiation');
        case Opt.LIST:
          return this.list(data);
        case Opt.STARTTLS:
          if (data.length) return this.invalid(option, 'NBD_OPT_STARTTLS carries no data');
          return this.reply(option, Rep.ERR_POLICY, 'TLS is not available on this gateway yet');
        case Opt.INFO:
        case Opt.GO:
          return this.infoOrGo(option, data);
        case Opt.STRUCTURED_REPLY:
          if (data.length) return this.invalid(option, 'NBD_OPT_STRUCTURED_REPLY carries no data');
          this.structured = true;
          return this.reply(option, Rep.ACK);
        case Opt.LIST_META_CONTEXT:
        case Opt.SET_META_CONTEXT:
          return this.metaContextOption(option, data);
        default:
          if (!this.fixedNewstyle) return this.fail(`option ${option} from a non-fixed-newstyle client`);
          this.log.debug(`unsupported option ${optionName(option)}`);
          return this.reply(option, Rep.ERR_UNSUP, `option ${option} is not supported`);
      }
    } catch (err) {
      if (!(err instanceof NbdProtocolError)) throw err;
      if (option === Opt.EXPORT_NAME) return this.fail(err.message);
      this.log.warn(`${optionName(option)}: ${err.message}`);
      const type = err.code === 'ERR_NBD_TOO_BIG' ? Rep.ERR_TOO_BIG : Rep.ERR_INVALID;
      return this.reply(option, type, err.message);
    }
  }

  private exportName(data: Buffer): void {
    const exp = this.lookup(decodeExportName(data));
    if (!exp) return this.fail(`NBD_OPT_EXPORT_NAME for unknown export '${data.toString()}'`);
    const flags = transmissionFlags(exp.device.capabilities(), this.structured);
    this.socket.write(encodeExportNameReply(exp.device.size, flags, this.noZeroes));
    this.enter(exp, flags);
  }

  private list(data: Buffer): void {
    if (data.length) return this.invalid(Opt.LIST, 'NBD_OPT_LIST carries no data');
    for (const e of this.registry.list()) {
      this.reply(Opt.LIST, Rep.SERVER, encodeServerEntry(e.name, e.description));
    }
    this.reply(Opt.LIST, Rep.ACK);
  }

  private infoOrGo(option: number, data: Buffer): void {
    const req = decodeInfoRequest(data);
    const exp = this.lookup(req.name);
    if (!exp) return this.reply(option, Rep.ERR_UNKNOWN, `no export named '${req.name}'`);
    const flags = transmissionFlags(exp.device.capabilities(), this.structured);
    this.reply(option, Rep.INFO, encodeInfo({ type: Info.EXPORT, size: exp.device.size, flags }));
    if (req.requests.includes(Info.NAME))
      this.reply(option, Rep.INFO, encodeInfo({ type: Info.NAME, name: exp.name }));
    if (req.requests.includes(Info.DESCRIPTION) && exp.description) {
      this.reply(option, Rep.INFO, encodeInfo({ type: Info.DESCRIPTION, description: exp.description }));
    }
    // Sent whether asked or not: the limits are the defaults except the maximum payload.
    this.reply(option, Rep.INFO, encodeInfo({ type: Info.BLOCK_SIZE, ...BLOCK_SIZE }));
    this.reply(option, Rep.ACK);
    if (option === Opt.GO) this.enter(exp, flags);
  }

  private metaContextOption(option: number, data: Buffer): void {
    const set = option === Opt.SET_META_CONTEXT;
    if (set) this.metaContext = null; // a SET replaces the selection even when it fails
    if (set && !this.structured) {
      return this.invalid(option, 'NBD_OPT_SET_META_CONTEXT before NBD_OPT_STRUCTURED_REPLY');
    }
    const req = decodeMetaContextRequest(data);
    const exp = this.lookup(req.exportName);
    if (!exp) return this.reply(option, Rep.ERR_UNKNOWN, `no export named '${req.exportName}'`);
    // Only base:allocation exists here. LIST answers it for an empty query list and the
    // "base:" wildcard; SET selects it only when named exactly.
    const matches = set
      ? req.queries.includes(BASE_ALLOCATION)
      : req.queries.length === 0 || req.queries.some((q) => q === BASE_ALLOCATION || q === 'base:');
    if (matches) {
      this.reply(
        option,
        Rep.META_CONTEXT,
        encodeMetaContextReply(set ? BASE_ALLOCATION_ID : 0, BASE_ALLOCATION),
      );
    }
    if (set) this.metaContext = { exportName: exp.name, baseAllocation: matches };
    this.reply(option, Rep.ACK);
  }

  private lookup(name: string): NbdExport | null {
    const resolved = name === '' ? this.registry.defaultExport() : name;
    return resolved === null ? null : this.registry.get(resolved);
  }

  private enter(exp: NbdExport, flags: number): void {
    const baseAllocation = this.metaContext?.exportName === exp.name && this.metaContext.baseAllocation;
    this.finished = true;
    this.done({
      export: exp,
      structuredReplies: this.structured,
      baseAllocation,
      flags,
      remainder: this.reader.remainder(),
    });
  }

  private reply(option: number, type: number, data?: Buffer | string): void {
    const payload = typeof data === 'string' ? Buffer.from(data) : data;
    this.socket.write(encodeOptionReply(option, type, payload));
  }

  private invalid(option: number, message: string): void {
    this.log.warn(`${optionName(option)}: ${message}`);
    this.reply(option, Rep.ERR_INVALID, message);
  }

  /** The client broke a MUST: log it and hang up. */
  private fail(reason: string): void {
    this.log.warn(`dropping connection: ${reason}`);
    this.finish(null, reason);
    this.socket.destroy();
  }

  private finish(result: null, reason: string): void {
    if (this.finished) return;
    this.finished = true;
    this.log.debug(`negotiation ended: ${reason}`);
    this.socket.end();
    this.done(result);
  }
}

function optionName(option: number): string {
  return OPTION_NAMES[option] ? `NBD_OPT_${OPTION_NAMES[option]}` : `option ${option}`;
}
