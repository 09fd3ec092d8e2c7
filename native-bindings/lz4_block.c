/*
 * LZ4 block format (no frame): a sequence of
 *   token (high nibble: literal length, low nibble: match length - 4),
 *   extra literal-length bytes (255 each, then the rest) when the nibble is 15,
 *   the literals, a 2-byte little-endian match offset, extra match-length bytes.
 * The last sequence has literals only; the last 5 bytes are always literals and
 * no match starts within the last 12 bytes. Written for blockgate's 4 KiB
 * blocks: a greedy single-probe compressor that skips ahead through stretches
 * without matches, and a bounds-checked decoder.
 */
#include "lz4_block.h"

#include <string.h>

#define MIN_MATCH 4
#define LAST_LITERALS 5
#define MATCH_SAFE_END 12
#define HASH_BITS 12
#define SKIP_TRIGGER 4

static uint32_t read32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

static uint32_t hash4(uint32_t v) { return (v * 2654435761u) >> (32 - HASH_BITS); }

static uint8_t *put_length(uint8_t *op, const uint8_t *oend, size_t len) {
  while (len >= 255) {
    if (op >= oend) return NULL;
    *op++ = 255;
    len -= 255;
  }
  if (op >= oend) return NULL;
  *op++ = (uint8_t)len;
  return op;
}

/* Emits one sequence; match_len 0 means the final literals-only sequence. */
static uint8_t *emit(uint8_t *op, const uint8_t *oend, const uint8_t *lit, size_t lit_len, size_t offset,
                     size_t match_len) {
  if (op >= oend) return NULL;
  uint8_t *token = op++;
  size_t ml = match_len ? match_len - MIN_MATCH : 0;
  *token = (uint8_t)(((lit_len >= 15 ? 15 : lit_len) << 4) | (match_len ? (ml >= 15 ? 15 : ml) : 0));
  if (lit_len >= 15 && !(op = put_length(op, oend, lit_len - 15))) return NULL;
  if ((size_t)(oend - op) < lit_len) return NULL;
  memcpy(op, lit, lit_len);
  op += lit_len;
  if (!match_len) return op;
  if (oend - op < 2) return NULL;
  *op++ = (uint8_t)(offset & 0xff);
  *op++ = (uint8_t)(offset >> 8);
  if (ml >= 15 && !(op = put_length(op, oend, ml - 15))) return NULL;
  return op;
}

long lz4_block_compress(const uint8_t *src, size_t n, uint8_t *dst, size_t cap) {
  uint16_t table[1 << HASH_BITS];
  const uint8_t *ip = src, *anchor = src, *end = src + n;
  uint8_t *op = dst, *oend = dst + cap;
  if (n > 65535) return -1; /* positions are 16-bit: blocks only */
  memset(table, 0, sizeof table);
  if (n >= MATCH_SAFE_END + 1) {
    const uint8_t *match_limit = end - MATCH_SAFE_END;
    /* Misses in a row, scaled: after 16 the probe starts skipping ahead, a byte more
     * every 16 misses, so incompressible stretches cost a fraction of a probe per byte
     * (the trade the reference LZ4 makes, a little sooner; a match resets it). After
     * 32 misses, as before, cost 7% more time on 4 KiB blocks of /usr/lib and
     * /usr/share/doc and 20% more on half-random blocks (fio's), for 0.6% less output. */
    unsigned misses = 1u << SKIP_TRIGGER;
    ip++;
    while (ip < match_limit) {
      uint32_t seq = read32(ip);
      uint32_t h = hash4(seq);
      const uint8_t *ref = src + table[h];
      table[h] = (uint16_t)(ip - src);
      if (ref < ip && ip - ref <= 65535 && read32(ref) == seq) {
        /* Extend backwards over equal bytes, then forwards up to the literal tail. */
        while (ip > anchor && ref > src && ip[-1] == ref[-1]) {
          ip--;
          ref--;
        }
        const uint8_t *mend = ip + MIN_MATCH, *rend = ref + MIN_MATCH;
        const uint8_t *mlimit = end - LAST_LITERALS;
        /* Eight bytes at a time: the first differing byte is the lowest set byte of the XOR. */
        while (mend + 8 <= mlimit) {
          uint64_t a, b;
          memcpy(&a, mend, 8);
          memcpy(&b, rend, 8);
          if (a != b) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
            size_t same = (size_t)__builtin_clzll(a ^ b) >> 3;
#else
            size_t same = (size_t)__builtin_ctzll(a ^ b) >> 3;
#endif
            mend += same;
            rend += same;
            goto extended;
          }
          mend += 8;
          rend += 8;
        }
        while (mend < mlimit && *mend == *rend) {
          mend++;
          rend++;
        }
      extended:
        op = emit(op, oend, anchor, (size_t)(ip - anchor), (size_t)(ip - ref), (size_t)(mend - ip));
        if (!op) return -1;
        ip = anchor = mend;
        misses = 1u << SKIP_TRIGGER;
        continue;
      }
      ip += misses++ >> SKIP_TRIGGER;
    }
  }
  op = emit(op, oend, anchor, (size_t)(end - anchor), 0, 0);
  return op ? op - dst : -1;
}

/* Adds a length's extension bytes (255 each, then the rest); NULL if the input ends first. */
static const uint8_t *get_length(const uint8_t *ip, const uint8_t *iend, size_t *len) {
  unsigned b;
  do {
    if (ip >= iend) return NULL;
    b = *ip++;
    *len += b;
  } while (b == 255);
  return ip;
}

long lz4_block_decompress(const uint8_t *src, size_t n, uint8_t *dst, size_t cap) {
  const uint8_t *ip = src, *iend = src + n;
  uint8_t *op = dst, *oend = dst + cap;
  while (ip < iend) {
    unsigned token = *ip++;
    size_t lit = token >> 4;
    if (lit == 15 && !(ip = get_length(ip, iend, &lit))) return -1;
    if ((size_t)(iend - ip) < lit || (size_t)(oend - op) < lit) return -1;
    memcpy(op, ip, lit);
    op += lit;
    ip += lit;
    if (ip == iend) break; /* the final sequence has no match */
    if (iend - ip < 2) return -1;
    size_t offset = (size_t)ip[0] | ((size_t)ip[1] << 8);
    ip += 2;
    if (offset == 0 || offset > (size_t)(op - dst)) return -1;
    size_t len = token & 15;
    if (len == 15 && !(ip = get_length(ip, iend, &len))) return -1;
    len += MIN_MATCH;
    if ((size_t)(oend - op) < len) return -1;
    const uint8_t *ref = op - offset;
    if (offset >= len) {
      memcpy(op, ref, len);
    } else if (offset == 1) {
      memset(op, *ref, len); /* a run of one byte */
    } else {
      /*
       * Overlapping: the match repeats the last `offset` bytes. Once one period is
       * written, op[0..done) is periodic from phase 0 whenever done is a multiple of
       * offset, so each further copy can take everything written so far.
       */
      memcpy(op, ref, offset);
      size_t done = offset;
      while (done < len) {
        size_t step = len - done < done ? len - done : done;
        memcpy(op + done, op, step);
        done += step;
      }
    }
    op += len;
  }
  return op - dst;
}
