/*
 * XXH3-128 keyed with a caller-supplied secret (xxHash's "withSecret" flavour,
 * which is the seed-0 algorithm with the default secret swapped out). Written
 * from the xxHash specification (doc/xxhash_spec.md in Cyan4973/xxHash) so the
 * dedup store can hash 4 KiB blocks without a JS allocation per digest, and
 * still produce bit for bit what xxhash-addon's XXHash128(secret) produced for
 * the hashes already on disk.
 *
 * The algorithm picks one of three shapes by input length:
 *   0..16    a few multiplies of the first/last input words against the secret;
 *   17..240  pairs of 16-byte chunks folded through 64x64->128 multiplies into
 *            two accumulators;
 *   241..    eight lane accumulators fed 64-byte stripes, scrambled after every
 *            block, merged into two halves at the end.
 * With seed 0 every "+ seed" / "- seed" term of the specification vanishes, so
 * they are left out here rather than carried as zeroes.
 *
 * Input and secret are always read as little-endian words, whatever the host.
 */
#include "xxh3_128.h"

#include <string.h>

/* See accumulate_stripes: x86 only, where SSE2 is part of the 64-bit baseline. */
#if defined(__SSE2__) && !defined(XXH3_128_PORTABLE)
#define XXH3_128_USE_SSE2
#include <emmintrin.h>
#endif

#define PRIME32_1 UINT64_C(0x9E3779B1)
#define PRIME32_2 UINT64_C(0x85EBCA77)
#define PRIME32_3 UINT64_C(0xC2B2AE3D)
#define PRIME64_1 UINT64_C(0x9E3779B185EBCA87)
#define PRIME64_2 UINT64_C(0xC2B2AE3D27D4EB4F)
#define PRIME64_3 UINT64_C(0x165667B19E3779F9)
#define PRIME64_4 UINT64_C(0x85EBCA77C2B2AE63)
#define PRIME64_5 UINT64_C(0x27D4EB2F165667C5)
#define PRIME_MX1 UINT64_C(0x165667919E3779F9)
#define PRIME_MX2 UINT64_C(0x9FB21C651E98DF25)

/* Long-input geometry: stripes of 8 lanes, and the secret slides 8 bytes per stripe. */
#define STRIPE_LEN 64
#define LANES 8
#define SECRET_STEP 8
/* Offsets the specification fixes for the long-input tail and the final merge. */
#define LAST_STRIPE_KEY_BACK 71 /* last stripe uses secret[secret_len - 71 ..] */
#define MERGE_LOW_KEY 11        /* low half merges against secret[11 ..] */
#define MERGE_HIGH_KEY_BACK 75  /* high half merges against secret[secret_len - 75 ..] */

/* ---- word access ------------------------------------------------------- */

static inline uint32_t swap32(uint32_t x) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_bswap32(x);
#else
  return (x >> 24) | ((x >> 8) & 0xFF00u) | ((x << 8) & 0xFF0000u) | (x << 24);
#endif
}

static inline uint64_t swap64(uint64_t x) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_bswap64(x);
#else
  return ((uint64_t)swap32((uint32_t)x) << 32) | swap32((uint32_t)(x >> 32));
#endif
}

/* memcpy, not a cast: input and secret may sit at any alignment, and the
 * compiler turns a fixed-size memcpy into a single unaligned load. */
static inline uint32_t le32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = swap32(v);
#endif
  return v;
}

static inline uint64_t le64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = swap64(v);
#endif
  return v;
}

static inline void store_be64(uint8_t *p, uint64_t v) {
  for (int i = 7; i >= 0; i--) {
    p[i] = (uint8_t)v;
    v >>= 8;
  }
}

static inline uint32_t rotl32(uint32_t x, unsigned r) { return (x << r) | (x >> (32 - r)); }

/* ---- arithmetic -------------------------------------------------------- */

/* Full 64x64 -> 128-bit product, returned as its two halves. */
static inline uint64_t mul_wide(uint64_t a, uint64_t b, uint64_t *high) {
#if defined(__SIZEOF_INT128__)
  unsigned __int128 p = (unsigned __int128)a * b;
  *high = (uint64_t)(p >> 64);
  return (uint64_t)p;
#else
  /* Schoolbook on 32-bit halves; `mid` collects the two cross terms plus the
   * carry out of the low word, none of which can overflow 64 bits. */
  uint64_t al = (uint32_t)a, ah = a >> 32, bl = (uint32_t)b, bh = b >> 32;
  uint64_t ll = al * bl, lh = al * bh, hl = ah * bl, hh = ah * bh;
  uint64_t mid = (ll >> 32) + (uint32_t)lh + (uint32_t)hl;
  *high = hh + (lh >> 32) + (hl >> 32) + (mid >> 32);
  return (mid << 32) | (uint32_t)ll;
#endif
}

/* XOR of the two halves of a 128-bit product: XXH3's basic mixing primitive. */
static inline uint64_t mul_fold(uint64_t a, uint64_t b) {
  uint64_t high;
  uint64_t low = mul_wide(a, b, &high);
  return low ^ high;
}

/* XXH64's finaliser; XXH3 reuses it for the tiniest inputs. */
static inline uint64_t avalanche_xxh64(uint64_t x) {
  x ^= x >> 33;
  x *= PRIME64_2;
  x ^= x >> 29;
  x *= PRIME64_3;
  x ^= x >> 32;
  return x;
}

/* XXH3's own, cheaper finaliser. */
static inline uint64_t avalanche_xxh3(uint64_t x) {
  x ^= x >> 37;
  x *= PRIME_MX1;
  x ^= x >> 32;
  return x;
}

/* ---- 0..16 bytes ------------------------------------------------------- */

static xxh3_128_hash hash_empty(const uint8_t *secret) {
  /* Nothing to mix in: each half is just a finalised pair of secret words. */
  xxh3_128_hash h;
  h.low = avalanche_xxh64(le64(secret + 64) ^ le64(secret + 72));
  h.high = avalanche_xxh64(le64(secret + 80) ^ le64(secret + 88));
  return h;
}

static xxh3_128_hash hash_1to3(const uint8_t *in, size_t len, const uint8_t *secret) {
  /* Pack first, middle and last byte with the length into one 32-bit word;
   * for len 1 all three bytes are the same, for len 2 middle == last. */
  uint32_t packed = (uint32_t)in[len - 1] | ((uint32_t)len << 8) | ((uint32_t)in[0] << 16) |
                    ((uint32_t)in[len >> 1] << 24);
  /* The high half sees the same word byte-reversed and rotated, so the two
   * halves do not merely differ by their secret words. */
  uint32_t packed_high = rotl32(swap32(packed), 13);
  uint64_t key_low = le32(secret) ^ le32(secret + 4);
  uint64_t key_high = le32(secret + 8) ^ le32(secret + 12);
  xxh3_128_hash h;
  h.low = avalanche_xxh64(key_low ^ packed);
  h.high = avalanche_xxh64(key_high ^ packed_high);
  return h;
}

static xxh3_128_hash hash_4to8(const uint8_t *in, size_t len, const uint8_t *secret) {
  /* First and last four bytes (overlapping when len < 8) cover the whole input. */
  uint64_t words = (uint64_t)le32(in) | ((uint64_t)le32(in + len - 4) << 32);
  uint64_t keyed = (le64(secret + 16) ^ le64(secret + 24)) ^ words;
  /* The length enters through the multiplier, so inputs that pad to the same
   * two words still differ. */
  uint64_t high;
  uint64_t low = mul_wide(keyed, PRIME64_1 + ((uint64_t)len << 2), &high);
  high += low << 1;
  low ^= high >> 3;
  low ^= low >> 35;
  low *= PRIME_MX2;
  low ^= low >> 28;
  xxh3_128_hash h;
  h.low = low;
  h.high = avalanche_xxh3(high);
  return h;
}

static xxh3_128_hash hash_9to16(const uint8_t *in, size_t len, const uint8_t *secret) {
  uint64_t first = le64(in);
  uint64_t last = le64(in + len - 8);
  uint64_t a = (le64(secret + 32) ^ le64(secret + 40)) ^ first ^ last;
  uint64_t b = (le64(secret + 48) ^ le64(secret + 56)) ^ last;
  uint64_t high;
  uint64_t low = mul_wide(a, PRIME64_1, &high);
  low += (uint64_t)(len - 1) << 54;
  /* b + lo32(b) * (PRIME32_2 - 1) is the specification's
   * (b with its low word cleared) + lo32(b) * PRIME32_2, one multiply cheaper. */
  high += b + (uint64_t)(uint32_t)b * (PRIME32_2 - 1);
  low ^= swap64(high);
  /* {low, high} *= PRIME64_2 as one 128-bit by 64-bit product. */
  uint64_t carry;
  uint64_t low2 = mul_wide(low, PRIME64_2, &carry);
  high = carry + high * PRIME64_2;
  xxh3_128_hash h;
  h.low = avalanche_xxh3(low2);
  h.high = avalanche_xxh3(high);
  return h;
}

/* ---- 17..240 bytes ----------------------------------------------------- */

/* One 16-byte chunk against 16 bytes of secret, folded to 64 bits. */
static inline uint64_t mix16(const uint8_t *chunk, const uint8_t *key) {
  return mul_fold(le64(chunk) ^ le64(key), le64(chunk + 8) ^ le64(key + 8));
}

/*
 * Feeds two chunks to the two medium-size accumulators. Each accumulator also
 * takes the raw sum of the *other* chunk, so a chunk that happens to cancel
 * its secret words (making its product 0) still changes the hash.
 */
static inline void mix_pair(uint64_t acc[2], const uint8_t *a, const uint8_t *b, const uint8_t *key) {
  acc[0] += mix16(a, key);
  acc[1] += mix16(b, key + 16);
  acc[0] ^= le64(b) + le64(b + 8);
  acc[1] ^= le64(a) + le64(a + 8);
}

/* Both medium paths finish the same way: low from the sum, high from a
 * different weighting of the accumulators plus the length, negated. */
static xxh3_128_hash finish_mid(const uint64_t acc[2], size_t len) {
  xxh3_128_hash h;
  h.low = avalanche_xxh3(acc[0] + acc[1]);
  h.high = (uint64_t)0 - avalanche_xxh3(acc[0] * PRIME64_1 + acc[1] * PRIME64_4 + (uint64_t)len * PRIME64_2);
  return h;
}

static xxh3_128_hash hash_17to128(const uint8_t *in, size_t len, const uint8_t *secret) {
  uint64_t acc[2] = {(uint64_t)len * PRIME64_1, 0};
  /* Pair the i-th chunk from the front with the i-th chunk from the back,
   * using as few pairs as cover the input (they overlap in the middle). The
   * specification runs the pairs innermost first; the accumulator update is
   * not commutative (add then xor), so that order is kept. */
  size_t pairs = ((len - 1) >> 5) + 1;
  for (size_t i = pairs; i-- > 0;) {
    mix_pair(acc, in + 16 * i, in + len - 16 - 16 * i, secret + 32 * i);
  }
  return finish_mid(acc, len);
}

static xxh3_128_hash hash_129to240(const uint8_t *in, size_t len, const uint8_t *secret) {
  uint64_t acc[2] = {(uint64_t)len * PRIME64_1, 0};
  /* The first 128 bytes use secret[0..128) ... */
  for (size_t i = 0; i < 4; i++) {
    mix_pair(acc, in + 32 * i, in + 32 * i + 16, secret + 32 * i);
  }
  acc[0] = avalanche_xxh3(acc[0]);
  acc[1] = avalanche_xxh3(acc[1]);
  /* ... the remaining whole 32-byte chunks restart at secret + 3, so the
   * secret bytes line up differently from the first pass ... */
  size_t chunks = len >> 5;
  for (size_t i = 4; i < chunks; i++) {
    mix_pair(acc, in + 32 * i, in + 32 * i + 16, secret + 32 * (i - 4) + 3);
  }
  /* ... and the last 32 bytes (possibly overlapping the above) go in with
   * their halves swapped, against secret[103..135), the top of the minimum
   * 136-byte secret. */
  mix_pair(acc, in + len - 16, in + len - 32, secret + 103);
  return finish_mid(acc, len);
}

/* ---- 241.. bytes ------------------------------------------------------- */

/*
 * One 64-byte stripe into the eight lane accumulators, keyed by 64 bytes of
 * secret. Lane i multiplies the low and high 32 bits of (input ^ key) into
 * acc[i], and also adds its raw input to the neighbouring lane acc[i ^ 1]
 * (both versions below write that as "acc[i] takes lane i ^ 1's raw input",
 * the same sum). The raw add keeps information the 32x32 product would lose when a
 * half of (input ^ key) is zero.
 *
 * This loop is nearly all of the time spent on a 4 KiB block. GCC 12 will not
 * vectorise the plain C version (the #else branch) at -O3 on baseline x86-64: it prices a 64-bit
 * vector multiply as three pmuludq and does not notice both factors fit in
 * 32 bits. So on x86 (where SSE2 is always present) the loop is spelt out
 * with SSE2 intrinsics -- two lanes per register, pmuludq for the 32x32->64
 * product -- which halves the time. Every other target, and builds defining
 * XXH3_128_PORTABLE (used to test the fallback), take the plain C.
 */
#ifdef XXH3_128_USE_SSE2
/* Stripe n uses the secret from byte 8n: the secret slides under the input. */
static inline void accumulate_stripes(uint64_t *restrict acc, const uint8_t *restrict in, size_t stripes,
                                      const uint8_t *restrict secret) {
  /* acc[2j], acc[2j + 1] live in register j; x86 is little-endian, so the
   * vector loads below see the same lane order the scalar code does. */
  __m128i a[LANES / 2];
  for (int j = 0; j < LANES / 2; j++) a[j] = _mm_loadu_si128((const __m128i *)(const void *)(acc + 2 * j));
  for (size_t n = 0; n < stripes; n++) {
    const uint8_t *stripe = in + n * STRIPE_LEN;
    const uint8_t *key = secret + n * SECRET_STEP;
    for (int j = 0; j < LANES / 2; j++) {
      __m128i raw = _mm_loadu_si128((const __m128i *)(const void *)(stripe + 16 * j));
      __m128i keyed = _mm_xor_si128(raw, _mm_loadu_si128((const __m128i *)(const void *)(key + 16 * j)));
      /* pmuludq multiplies the low 32 bits of each 64-bit lane; moving each
       * lane's high half down gives lo32 * hi32 per lane. */
      __m128i product = _mm_mul_epu32(keyed, _mm_srli_epi64(keyed, 32));
      /* Swap the two 64-bit lanes: lane 2j takes lane 2j+1's raw input and vice versa. */
      __m128i neighbour = _mm_shuffle_epi32(raw, _MM_SHUFFLE(1, 0, 3, 2));
      a[j] = _mm_add_epi64(a[j], _mm_add_epi64(product, neighbour));
    }
  }
  for (int j = 0; j < LANES / 2; j++) _mm_storeu_si128((__m128i *)(void *)(acc + 2 * j), a[j]);
}
#else
static inline void accumulate_stripe(uint64_t *restrict acc, const uint8_t *restrict stripe,
                                     const uint8_t *restrict key) {
  uint64_t raw[LANES], keyed[LANES];
  for (int i = 0; i < LANES; i++) {
    raw[i] = le64(stripe + 8 * i);
    keyed[i] = raw[i] ^ le64(key + 8 * i);
  }
  for (int i = 0; i < LANES; i++) {
    acc[i] += raw[i ^ 1] + (keyed[i] & 0xFFFFFFFFu) * (keyed[i] >> 32);
  }
}

/* Stripe n uses the secret from byte 8n: the secret slides under the input. */
static inline void accumulate_stripes(uint64_t *restrict acc, const uint8_t *restrict in, size_t stripes,
                                      const uint8_t *restrict secret) {
  for (size_t n = 0; n < stripes; n++) {
    accumulate_stripe(acc, in + n * STRIPE_LEN, secret + n * SECRET_STEP);
  }
}
#endif

/* After each block: fold high bits down and re-key, so that the long run of
 * additions cannot let a lane settle into a pattern. */
static inline void scramble(uint64_t *restrict acc, const uint8_t *restrict key) {
  for (int i = 0; i < LANES; i++) {
    uint64_t a = acc[i];
    a ^= a >> 47;
    a ^= le64(key + 8 * i);
    acc[i] = a * PRIME32_1;
  }
}

/* Collapses the eight lanes into one 64-bit half against 64 bytes of secret. */
static uint64_t merge_lanes(const uint64_t acc[LANES], const uint8_t *key, uint64_t start) {
  uint64_t r = start;
  for (int i = 0; i < LANES; i += 2) {
    r += mul_fold(acc[i] ^ le64(key + 8 * i), acc[i + 1] ^ le64(key + 8 * i + 8));
  }
  return avalanche_xxh3(r);
}

static xxh3_128_hash hash_long(const uint8_t *in, size_t len, const uint8_t *secret, size_t secret_len) {
  uint64_t acc[LANES] = {PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1};
  /* A block is as many stripes as the secret can slide under while leaving
   * its last 64 bytes for the scramble key: 16 stripes (1 KiB) for a 192-byte
   * secret, 9 (576 bytes) for the minimum 136. */
  const size_t stripes_per_block = (secret_len - STRIPE_LEN) / SECRET_STEP;
  const size_t block_len = STRIPE_LEN * stripes_per_block;
  const uint8_t *scramble_key = secret + secret_len - STRIPE_LEN;

  /* Whole blocks, each followed by a scramble -- but never the final block,
   * even when it is whole: (len - 1) keeps at least one byte back for the
   * tail, which is finished without a scramble. */
  const size_t full_blocks = (len - 1) / block_len;
  for (size_t b = 0; b < full_blocks; b++) {
    accumulate_stripes(acc, in + b * block_len, stripes_per_block, secret);
    scramble(acc, scramble_key);
  }

  /* The tail (1..block_len bytes): its whole stripes except the last one,
   * then the last 64 bytes of the input as a stripe of their own. That last
   * stripe may reach back into bytes already hashed; it gets its own secret
   * offset so it is not a mere repeat. */
  const size_t tail_len = len - full_blocks * block_len;
  accumulate_stripes(acc, in + full_blocks * block_len, (tail_len - 1) / STRIPE_LEN, secret);
  accumulate_stripes(acc, in + len - STRIPE_LEN, 1, secret + secret_len - LAST_STRIPE_KEY_BACK);

  xxh3_128_hash h;
  h.low = merge_lanes(acc, secret + MERGE_LOW_KEY, (uint64_t)len * PRIME64_1);
  h.high = merge_lanes(acc, secret + secret_len - MERGE_HIGH_KEY_BACK, ~((uint64_t)len * PRIME64_2));
  return h;
}

/* ---- entry points ------------------------------------------------------ */

xxh3_128_hash xxh3_128_with_secret(const uint8_t *data, size_t len, const uint8_t *secret, size_t secret_len) {
  if (len <= 16) {
    if (len > 8) return hash_9to16(data, len, secret);
    if (len >= 4) return hash_4to8(data, len, secret);
    if (len > 0) return hash_1to3(data, len, secret);
    return hash_empty(secret);
  }
  if (len <= 128) return hash_17to128(data, len, secret);
  if (len <= 240) return hash_129to240(data, len, secret);
  return hash_long(data, len, secret, secret_len);
}

void xxh3_128_canonical(xxh3_128_hash h, uint8_t out[XXH3_128_CANONICAL_SIZE]) {
  /* Big-endian, high half first: the digit order of the 128-bit number. */
  store_be64(out, h.high);
  store_be64(out + 8, h.low);
}
