#ifndef BLOCKGATE_LZ4_BLOCK_H
#define BLOCKGATE_LZ4_BLOCK_H
#include <stddef.h>
#include <stdint.h>

/* Compresses n bytes (n <= 65535) into dst; returns the compressed size, or -1 if it does not fit in cap. */
long lz4_block_compress(const uint8_t *src, size_t n, uint8_t *dst, size_t cap);
/* Decompresses into dst; returns the decompressed size, or -1 for malformed input or overflow. */
long lz4_block_decompress(const uint8_t *src, size_t n, uint8_t *dst, size_t cap);

#endif
