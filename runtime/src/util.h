/* Small helpers: allocation that never returns NULL, whole-file reads, hex. */
#ifndef SCONIFY_RUN_UTIL_H
#define SCONIFY_RUN_UTIL_H

#include <stddef.h>
#include <stdint.h>

void *xmalloc(size_t size);
void *xcalloc(size_t count, size_t size);
void *xrealloc(void *ptr, size_t size);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);

/* Read the whole of FD (at most MAX bytes) into a new buffer; returns 0 or an errno value (EFBIG if larger). */
int read_fd(int fd, size_t max, unsigned char **data, size_t *length);

/* Decode exactly LENGTH bytes from a hex string of 2 * LENGTH digits (either case); returns 0 on success. */
int hex_decode(const char *hex, unsigned char *out, size_t length);

/* Write 2 * LENGTH lowercase hex digits and a terminating NUL to OUT. */
void hex_encode(const unsigned char *data, size_t length, char *out);

static inline void put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static inline void put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static inline uint16_t get_u16(const unsigned char *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static inline uint32_t get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline uint64_t get_u64(const unsigned char *p)
{
    return (uint64_t)get_u32(p) | ((uint64_t)get_u32(p + 4) << 32);
}

#endif
