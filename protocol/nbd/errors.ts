/**
 * A peer broke the protocol. `code` is stable; the session decides whether the
 * breach costs an error reply (ERR_INVALID, ERR_TOO_BIG) or the connection.
 */
export type NbdProtocolErrorCode =
  | 'ERR_NBD_BAD_MAGIC'
  | 'ERR_NBD_BAD_CLIENT_FLAGS'
  | 'ERR_NBD_INVALID_OPTION'
  | 'ERR_NBD_TOO_BIG'
  | 'ERR_NBD_TRUNCATED';

export class NbdProtocolError extends Error {
  override readonly name = 'NbdProtocolError';
  constructor(
    readonly code: NbdProtocolErrorCode,
    message: string,
  ) {
    super(message);
  }
}
