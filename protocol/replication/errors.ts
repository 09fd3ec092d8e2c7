/** A peer broke the replication link's protocol. `code` is stable and travels in the Error frame. */
export class LinkProtocolError extends Error {
  override readonly name = 'LinkProtocolError';
  constructor(
    readonly code:
      | 'ERR_LINK_FRAME_TOO_LARGE'
      | 'ERR_LINK_MALFORMED'
      | 'ERR_LINK_UNKNOWN_MESSAGE'
      | 'ERR_LINK_UNEXPECTED'
      | 'ERR_LINK_VERSION'
      | 'ERR_LINK_AUTH'
      | 'ERR_LINK_TIMEOUT'
      | 'ERR_LINK_UNKNOWN_VOLUME'
      | 'ERR_LINK_NOT_REPLICA'
      | 'ERR_LINK_BAD_BLOCK'
      | 'ERR_LINK_DOMAIN'
      | 'ERR_LINK_STALE_GENERATION'
      | 'ERR_LINK_REFUSED',
    message: string,
  ) {
    super(message);
  }
}
