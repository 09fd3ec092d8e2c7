// Errors of the gateway's control plane, each with a stable `code` that the
// admin protocol carries and the CLI prints. Block I/O errors live in
// device/errors.ts and are translated to NBD at the edge.

export class BlockgateError extends Error {
  override name = 'BlockgateError';
  readonly code: string = 'ERR_BLOCKGATE';
}

export class InvalidArgumentError extends BlockgateError {
  override name = 'InvalidArgumentError';
  override readonly code = 'ERR_INVALID_ARGUMENT';
}

export class BadRequestError extends BlockgateError {
  override name = 'BadRequestError';
  override readonly code = 'ERR_BAD_REQUEST';
}

export class UnknownCommandError extends BlockgateError {
  override name = 'UnknownCommandError';
  override readonly code = 'ERR_UNKNOWN_COMMAND';
}

export class VolumeExistsError extends BlockgateError {
  override name = 'VolumeExistsError';
  override readonly code = 'ERR_VOLUME_EXISTS';
}

export class VolumeNotFoundError extends BlockgateError {
  override name = 'VolumeNotFoundError';
  override readonly code = 'ERR_VOLUME_NOT_FOUND';
}

export class VolumeBusyError extends BlockgateError {
  override name = 'VolumeBusyError';
  override readonly code = 'ERR_VOLUME_BUSY';
}

export class BackendError extends BlockgateError {
  override name = 'BackendError';
  override readonly code = 'ERR_BACKEND';
}

export class DataDirLockedError extends BlockgateError {
  override name = 'DataDirLockedError';
  override readonly code = 'ERR_DATA_DIR_LOCKED';
}

export class GatewayUnavailableError extends BlockgateError {
  override name = 'GatewayUnavailableError';
  override readonly code = 'ERR_GATEWAY_UNAVAILABLE';
}

/** A seed bundle that cannot be imported: truncated, damaged past repair, foreign, or not a bundle. */
export class SeedError extends BlockgateError {
  override name = 'SeedError';
  override readonly code = 'ERR_SEED_BUNDLE';
}
