// Errors a BlockDevice may raise. Each carries an errno-like `code` that the
// NBD edge translates to a wire error exactly once; layers never deal in NBD
// numbers.

export type BlockErrno =
  'EPERM' | 'EIO' | 'ENOMEM' | 'EINVAL' | 'ENOSPC' | 'EOVERFLOW' | 'ENOTSUP' | 'ESHUTDOWN';

export class BlockError extends Error {
  override readonly name = 'BlockError';
  constructor(
    readonly code: BlockErrno,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

const FROM_SYSTEM: Record<string, BlockErrno> = {
  EPERM: 'EPERM',
  EACCES: 'EPERM',
  EROFS: 'EPERM',
  ENOSPC: 'ENOSPC',
  EDQUOT: 'ENOSPC',
  EFBIG: 'ENOSPC',
  ENOMEM: 'ENOMEM',
  EINVAL: 'EINVAL',
  EOPNOTSUPP: 'ENOTSUP',
  ENOTSUP: 'ENOTSUP',
};

/** Maps anything thrown below a device (fs errors, addon errors) to a BlockError. */
export function toBlockError(err: unknown, what: string): BlockError {
  if (err instanceof BlockError) return err;
  const sys = (err as { code?: unknown })?.code;
  const code = (typeof sys === 'string' && FROM_SYSTEM[sys]) || 'EIO';
  const detail = err instanceof Error ? err.message : String(err);
  return new BlockError(code, `${what}: ${detail}`, { cause: err });
}
