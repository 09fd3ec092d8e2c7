// Wire constants of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md).
// All integers on the wire are big-endian.

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const HandshakeFlag = { FIXED_NEWSTYLE: 1, NO_ZEROES: 2 } as const;
export const ClientFlag = { FIXED_NEWSTYLE: 1, NO_ZEROES: 2 } as const;
export const KNOWN_CLIENT_FLAGS = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES;

export const Opt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

export const Rep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001,
  ERR_POLICY: 0x80000002,
  ERR_INVALID: 0x80000003,
  ERR_PLATFORM: 0x80000004,
  ERR_TLS_REQD: 0x80000005,
  ERR_UNKNOWN: 0x80000006,
  ERR_SHUTDOWN: 0x80000007,
  ERR_BLOCK_SIZE_REQD: 0x80000008,
  ERR_TOO_BIG: 0x80000009,
} as const;

export const Info = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

export const TransmissionFlag = {
  HAS_FLAGS: 0x1,
  READ_ONLY: 0x2,
  SEND_FLUSH: 0x4,
  SEND_FUA: 0x8,
  ROTATIONAL: 0x10,
  SEND_TRIM: 0x20,
  SEND_WRITE_ZEROES: 0x40,
  SEND_DF: 0x80,
  CAN_MULTI_CONN: 0x100,
  SEND_RESIZE: 0x200,
  SEND_CACHE: 0x400,
  SEND_FAST_ZERO: 0x800,
} as const;

export const Cmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;

export const CmdFlag = { FUA: 0x1, NO_HOLE: 0x2, DF: 0x4, REQ_ONE: 0x8, FAST_ZERO: 0x10 } as const;

export const ReplyFlag = { DONE: 0x1 } as const;

export const ChunkType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: 0x8001,
  ERROR_OFFSET: 0x8002,
} as const;

/** NBD error values; they match Linux errno numbers. */
export const NbdErr = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

export const AllocationFlag = { HOLE: 1, ZERO: 2 } as const;
export const BASE_ALLOCATION = 'base:allocation';

export const Size = {
  OPTION_HEADER: 16,
  OPTION_REPLY_HEADER: 20,
  REQUEST: 28,
  SIMPLE_REPLY: 16,
  STRUCTURED_REPLY_HEADER: 20,
  EXPORT_NAME_REPLY: 10,
  EXPORT_NAME_ZEROES: 124,
  SERVER_GREETING: 18,
} as const;

/** The protocol's cap on any string (export names, messages, queries). */
export const MAX_STRING = 4096;
