import { TransmissionFlag as F } from '../../protocol/nbd/constants';
import type { Capabilities } from '../device/block-device';

/** Transmission flags advertised for a device: only what its stack honestly does. */
export function transmissionFlags(caps: Capabilities, structuredReplies: boolean): number {
  let flags = F.HAS_FLAGS;
  if (caps.readOnly) flags |= F.READ_ONLY;
  if (caps.flush) flags |= F.SEND_FLUSH;
  if (caps.fua) flags |= F.SEND_FUA;
  if (!caps.readOnly && caps.trim) flags |= F.SEND_TRIM;
  if (!caps.readOnly && caps.zero) {
    flags |= F.SEND_WRITE_ZEROES;
    if (caps.fastZero) flags |= F.SEND_FAST_ZERO;
  }
  if (structuredReplies) flags |= F.SEND_DF;
  if (caps.multiConn) flags |= F.CAN_MULTI_CONN;
  if (caps.cache) flags |= F.SEND_CACHE;
  return flags;
}

/** Block size constraints: any byte granularity works, 4 KiB is best, 32 MiB per request. */
export const BLOCK_SIZE = { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 } as const;
