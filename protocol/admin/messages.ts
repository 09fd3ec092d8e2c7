// The admin protocol: one JSON object per line over the gateway's Unix
// socket. A request names a command and its arguments; the reply carries the
// same id and either a result or an error with a stable code.

export interface AdminRequest {
  id: number;
  command: string;
  args: Record<string, unknown>;
}

export type AdminResponse =
  | { id: number | null; ok: true; result: unknown }
  | { id: number | null; ok: false; error: { code: string; message: string } };

/** Longest line either side accepts. */
export const MAX_LINE = 1024 * 1024;

export function encodeMessage(msg: AdminRequest | AdminResponse): string {
  return JSON.stringify(msg) + '\n';
}

export class AdminDecodeError extends Error {
  readonly code = 'ERR_BAD_REQUEST';
}

export function decodeRequest(line: string): AdminRequest {
  let parsed: unknown;
  try {
    parsed = JSON.parse(line);
  } catch {
    throw new AdminDecodeError('request is not valid JSON');
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
    throw new AdminDecodeError('request must be a JSON object');
  }
  const { id, command, args } = parsed as Record<string, unknown>;
  if (typeof id !== 'number' || !Number.isInteger(id))
    throw new AdminDecodeError('request needs an integer id');
  if (typeof command !== 'string' || command === '') throw new AdminDecodeError('request needs a command');
  if (args !== undefined && (typeof args !== 'object' || args === null || Array.isArray(args))) {
    throw new AdminDecodeError('args must be an object');
  }
  return { id, command, args: (args ?? {}) as Record<string, unknown> };
}

export function decodeResponse(line: string): AdminResponse {
  const parsed = JSON.parse(line) as AdminResponse;
  if (typeof parsed !== 'object' || parsed === null || typeof parsed.ok !== 'boolean') {
    throw new AdminDecodeError('malformed response from gateway');
  }
  return parsed;
}

/** Splits a stream of text into lines, refusing lines over MAX_LINE. */
export class LineSplitter {
  private partial = '';

  /** Returns the complete lines in `text`; throws once the unfinished line is too long. */
  push(text: string): string[] {
    const parts = (this.partial + text).split('\n');
    this.partial = parts.pop()!;
    if (this.partial.length > MAX_LINE) throw new AdminDecodeError(`line longer than ${MAX_LINE} bytes`);
    return parts.filter((l) => l.trim() !== '');
  }
}
