#ifndef BLOCKGATE_XXH3_128_H
#define BLOCKGATE_XXH3_128_H
#include <stddef.h>
#include <stdint.h>

/* The smallest secret the specification allows; the 129..240-byte path reads up to secret[134]. */
#define XXH3_128_SECRET_MIN 136
/* Size of the canonical (big-endian) form of a 128-bit hash. */
#define XXH3_128_CANONICAL_SIZE 16

typedef struct {
  uint64_t low;
  uint64_t high;
} xxh3_128_hash;

/*
 * XXH3-128 of data[0..len) keyed with secret[0..secret_len), seed 0: the value
 * xxHash's XXH3_128bits_withSecret (and reset_withSecret + update + digest)
 * computes. secret_len must be >= XXH3_128_SECRET_MIN; data may be NULL when
 * len is 0.
 */
xxh3_128_hash xxh3_128_with_secret(const uint8_t *data, size_t len, const uint8_t *secret, size_t secret_len);

/* Writes the canonical form: high 64 bits then low 64 bits, each big-endian. */
void xxh3_128_canonical(xxh3_128_hash h, uint8_t out[XXH3_128_CANONICAL_SIZE]);

#endif
