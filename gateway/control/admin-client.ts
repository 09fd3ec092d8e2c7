import net from 'node:net';
import { decodeResponse, encodeMessage, LineSplitter } from '../../protocol/admin/messages';
import { BlockgateError, GatewayUnavailableError } from '../errors';

/** A failure the gateway reported, with its stable code. */
export class RemoteError extends BlockgateError {
  override name = 'RemoteError';
  constructor(
    override readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

/** Sends one command to the gateway at `socketPath` and returns its result. */
export function callGateway(
  socketPath: string,
  command: string,
  args: Record<string, unknown> = {},
): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(socketPath);
    const lines = new LineSplitter();
    let settled = false;
    const settle = (fn: () => void): void => {
      if (settled) return;
      settled = true;
      socket.destroy();
      fn();
    };
    socket.setEncoding('utf8');
    socket.on('connect', () => socket.write(encodeMessage({ id: 1, command, args })));
    socket.on('data', (text: string) => {
      for (const line of lines.push(text)) {
        const res = decodeResponse(line);
        if (res.ok) settle(() => resolve(res.result));
        else settle(() => reject(new RemoteError(res.error.code, res.error.message)));
      }
    });
    socket.on('error', (err: NodeJS.ErrnoException) =>
      settle(() =>
        reject(
          new GatewayUnavailableError(
            err.code === 'ENOENT' || err.code === 'ECONNREFUSED'
              ? `no gateway is running at ${socketPath} (start one with 'blockgate serve')`
              : `cannot reach the gateway at ${socketPath}: ${err.message}`,
          ),
        ),
      ),
    );
    socket.on('close', () =>
      settle(() => reject(new GatewayUnavailableError('gateway closed the admin connection'))),
    );
  });
}
