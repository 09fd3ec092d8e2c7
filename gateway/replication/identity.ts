// Who a gateway is on replication links: a persistent id kept in its data
// directory, and the cluster key every gateway of the cluster shares.

import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { InvalidArgumentError } from '../errors';

const ID_FILE = 'gateway-id';
/** Shorter keys are refused: the key is the only thing that keeps strangers off a link. */
const MIN_KEY_BYTES = 16;

/** The data directory's gateway id (32 hex digits), made on first use. */
export function gatewayId(dataDir: string): string {
  const file = path.join(dataDir, ID_FILE);
  try {
    const id = fs.readFileSync(file, 'utf8').trim();
    if (/^[0-9a-f]{32}$/.test(id)) return id;
    throw new InvalidArgumentError(`${file} does not hold a gateway id`);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  const id = crypto.randomBytes(16).toString('hex');
  const tmp = `${file}.tmp`;
  fs.writeFileSync(tmp, `${id}\n`, { mode: 0o600 });
  fs.renameSync(tmp, file);
  return id;
}

/**
 * The cluster key from a file: its bytes, less one trailing newline (so both
 * `head -c 32 /dev/urandom` and `openssl rand -hex 32` make good key files).
 */
export function loadClusterKey(file: string): { key: Buffer; warning?: string } {
  let bytes: Buffer;
  try {
    bytes = fs.readFileSync(file);
  } catch (err) {
    throw new InvalidArgumentError(`cannot read cluster key ${file}: ${(err as Error).message}`);
  }
  if (bytes.length > 0 && bytes[bytes.length - 1] === 0x0a) bytes = bytes.subarray(0, bytes.length - 1);
  if (bytes.length < MIN_KEY_BYTES) {
    throw new InvalidArgumentError(
      `cluster key ${file} is ${bytes.length} bytes; at least ${MIN_KEY_BYTES} needed`,
    );
  }
  const mode = fs.statSync(file).mode & 0o077;
  return mode === 0
    ? { key: bytes }
    : {
        key: bytes,
        warning: `cluster key ${file} is readable by other users (mode ${(fs.statSync(file).mode & 0o777).toString(8)})`,
      };
}
