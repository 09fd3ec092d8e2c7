import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { record } from './plain-record';
import { Info, MAX_STRING, Size } from '../../protocol/nbd/constants';
import {
  decodeExportName,
  decodeInfo,
  decodeInfoRequest,
  decodeMetaContextReply,
  decodeMetaContextRequest,
  decodeOptionHeader,
  decodeOptionReplyHeader,
  decodeServerEntry,
  decodeServerGreeting,
  encodeExportNameReply,
  encodeInfo,
  encodeInfoRequest,
  encodeMetaContextReply,
  encodeMetaContextRequest,
  encodeOption,
  encodeOptionReply,
  encodeServerEntry,
  encodeServerGreeting,
  InfoPayload,
} from '../../protocol/nbd/handshake';

const u16 = fc.integer({ min: 0, max: 0xffff });
const u32 = fc.integer({ min: 0, max: 0xffffffff });
/** NUL-free strings, as the protocol requires. */
const name = fc.string({ maxLength: 64 }).filter((s) => !s.includes('\0'));

describe('handshake codecs', () => {
  it('round-trips the server greeting', () => {
    fc.assert(
      fc.property(u16, (flags) => assert.equal(decodeServerGreeting(encodeServerGreeting(flags)), flags)),
    );
  });

  it('starts the greeting with NBDMAGIC and IHAVEOPT', () => {
    assert.equal(encodeServerGreeting(3).subarray(0, 16).toString('latin1'), 'NBDMAGICIHAVEOPT');
  });

  it('round-trips option headers', () => {
    fc.assert(
      fc.property(u32, fc.uint8Array({ maxLength: 32 }), (option, data) => {
        const buf = encodeOption(option, Buffer.from(data));
        assert.deepEqual(decodeOptionHeader(buf, 0), { option, length: data.length });
        assert.deepEqual(buf.subarray(Size.OPTION_HEADER), Buffer.from(data));
      }),
    );
  });

  it('refuses an option without IHAVEOPT', () => {
    assert.throws(() => decodeOptionHeader(Buffer.alloc(16), 0), { code: 'ERR_NBD_BAD_MAGIC' });
  });

  it('round-trips option replies', () => {
    fc.assert(
      fc.property(u32, u32, fc.uint8Array({ maxLength: 32 }), (option, type, data) => {
        const buf = encodeOptionReply(option, type, Buffer.from(data));
        assert.deepEqual(decodeOptionReplyHeader(buf, 0), { option, type, length: data.length });
      }),
    );
  });

  it('round-trips INFO/GO requests', () => {
    fc.assert(
      fc.property(name, fc.array(u16, { maxLength: 8 }), (n, requests) => {
        assert.deepEqual(decodeInfoRequest(encodeInfoRequest({ name: n, requests })), { name: n, requests });
      }),
    );
  });

  it('refuses an INFO request whose name length overruns the option', () => {
    const data = encodeInfoRequest({ name: 'disk0', requests: [] });
    data.writeUInt32BE(100, 0);
    assert.throws(() => decodeInfoRequest(data), { code: 'ERR_NBD_INVALID_OPTION' });
  });

  it('refuses an INFO request with trailing bytes', () => {
    const data = Buffer.concat([encodeInfoRequest({ name: 'a', requests: [1] }), Buffer.alloc(1)]);
    assert.throws(() => decodeInfoRequest(data), { code: 'ERR_NBD_INVALID_OPTION' });
  });

  it('refuses an export name over 4096 bytes as too big', () => {
    const long = 'x'.repeat(MAX_STRING + 1);
    assert.throws(() => decodeInfoRequest(encodeInfoRequest({ name: long, requests: [] })), {
      code: 'ERR_NBD_TOO_BIG',
    });
    assert.throws(() => decodeExportName(Buffer.from(long)), { code: 'ERR_NBD_TOO_BIG' });
  });

  it('refuses names with NUL bytes or invalid UTF-8', () => {
    assert.throws(() => decodeExportName(Buffer.from([0x61, 0x00])), { code: 'ERR_NBD_INVALID_OPTION' });
    assert.throws(() => decodeExportName(Buffer.from([0xff, 0xfe])), { code: 'ERR_NBD_INVALID_OPTION' });
  });

  it('round-trips meta context requests', () => {
    fc.assert(
      fc.property(name, fc.array(name, { maxLength: 6 }), (exportName, queries) => {
        const req = { exportName, queries };
        assert.deepEqual(decodeMetaContextRequest(encodeMetaContextRequest(req)), req);
      }),
    );
  });

  it('refuses a meta context query that overruns the option', () => {
    const data = encodeMetaContextRequest({ exportName: 'd', queries: ['base:allocation'] });
    data.writeUInt32BE(1000, data.length - 'base:allocation'.length - 4);
    assert.throws(() => decodeMetaContextRequest(data), { code: 'ERR_NBD_INVALID_OPTION' });
  });

  it('round-trips LIST entries and meta context replies', () => {
    fc.assert(
      fc.property(name, name, u32, (n, description, id) => {
        assert.deepEqual(decodeServerEntry(encodeServerEntry(n, description)), { name: n, description });
        assert.deepEqual(decodeMetaContextReply(encodeMetaContextReply(id, n)), { id, name: n });
      }),
    );
  });

  it('round-trips every info payload', () => {
    const infoArb: fc.Arbitrary<InfoPayload> = fc.oneof(
      record({ type: fc.constant(Info.EXPORT), size: fc.integer({ min: 0, max: 2 ** 52 }), flags: u16 }),
      record({ type: fc.constant(Info.NAME), name }),
      record({ type: fc.constant(Info.DESCRIPTION), description: name }),
      record({ type: fc.constant(Info.BLOCK_SIZE), minimum: u32, preferred: u32, maximum: u32 }),
    );
    fc.assert(fc.property(infoArb, (info) => assert.deepEqual(decodeInfo(encodeInfo(info)), info)));
  });

  it('pads the EXPORT_NAME reply with 124 zeroes unless NO_ZEROES', () => {
    assert.equal(encodeExportNameReply(1, 1, false).length, 134);
    assert.equal(encodeExportNameReply(1, 1, true).length, 10);
  });
});
