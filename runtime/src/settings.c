/* Enclave settings from SCONE's environment variables, parsed as sconify/enclave/settings.py parses them. */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fail.h"
#include "measure.h"

#define PAGE 4096ULL
#define KIB (1ULL << 10)
#define MIB (1ULL << 20)
#define GIB (1ULL << 30)
#define TIB (1ULL << 40)
#define DEFAULT_HEAP (64 * MIB)
#define DEFAULT_STACK (1 * MIB)
#define DEFAULT_THREADS 8
#define MAX_HEAP (1 * TIB)
#define MAX_STACK (1 * GIB)
#define MAX_THREADS 4096

/* Python's \s for these characters (str patterns also match the ASCII separators 0x1c-0x1f). */
static int is_space(unsigned char c)
{
    return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f);
}

static const char *format_size(uint64_t n, char *buf, size_t len)
{
    static const struct { char suffix; uint64_t unit; } units[] = {{'T', TIB}, {'G', GIB}, {'M', MIB}, {'K', KIB}};
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++) {
        if (n >= units[i].unit && n % units[i].unit == 0) {
            snprintf(buf, len, "%llu%c", (unsigned long long)(n / units[i].unit), units[i].suffix);
            return buf;
        }
    }
    snprintf(buf, len, "%llu", (unsigned long long)n);
    return buf;
}

/* A size in SCONE's notation: digits, an optional K/M/G/T and an optional B or iB. -1: not a size; 1: too big. */
static int parse_size(const char *text, uint64_t *out)
{
    const unsigned char *p = (const unsigned char *)text;
    while (is_space(*p)) p++;
    if (!isdigit(*p)) return -1;
    uint64_t value = 0;
    int overflow = 0;
    while (isdigit(*p)) {
        unsigned digit = (unsigned)(*p++ - '0');
        if (value > (UINT64_MAX - digit) / 10) overflow = 1;
        else value = value * 10 + digit;
    }
    while (is_space(*p)) p++;
    uint64_t unit = 1;
    switch (tolower(*p)) {
    case 'k': unit = KIB; p++; break;
    case 'm': unit = MIB; p++; break;
    case 'g': unit = GIB; p++; break;
    case 't': unit = TIB; p++; break;
    default: break;
    }
    if (tolower(p[0]) == 'i' && tolower(p[1]) == 'b') p += 2;
    else if (tolower(p[0]) == 'b') p += 1;
    while (is_space(*p)) p++;
    if (*p) return -1;
    if (overflow || value > UINT64_MAX / unit) return 1;
    *out = value * unit;
    return 0;
}

static int size_setting(const char *name, const char *what, uint64_t fallback, uint64_t limit, uint64_t *out,
                        char *err, size_t errlen)
{
    const char *text = getenv(name);
    char a[32], b[32];
    if (!text || !*text) {
        *out = fallback;
        return 0;
    }
    uint64_t value = 0;
    int rc = parse_size(text, &value);
    if (rc < 0) {
        message(err, errlen, "%s '%s' is not a size; give bytes or a number with K, M, G or T, like %s", name, text,
                format_size(fallback, a, sizeof a));
        return -1;
    }
    if (rc == 0 && value <= UINT64_MAX - (PAGE - 1)) value = (value + PAGE - 1) / PAGE * PAGE;
    else rc = 1;
    if (rc == 0 && value == 0) {
        message(err, errlen, "%s '%s' gives an enclave %s size of 0 bytes; give a size such as %s", name, text,
                what, format_size(fallback, a, sizeof a));
        return -1;
    }
    if (rc != 0 || value > limit) {
        message(err, errlen, "%s '%s' is larger than the supported enclave %s size %s; give a smaller size", name,
                text, what, format_size(limit, b, sizeof b));
        return -1;
    }
    *out = value;
    return 0;
}

/* TEXT without leading and trailing whitespace, lowercased, into BUF; returns BUF. */
static char *trimmed_lower(const char *text, char *buf, size_t len)
{
    while (is_space((unsigned char)*text)) text++;
    size_t n = strlen(text);
    while (n && is_space((unsigned char)text[n - 1])) n--;
    if (n >= len) n = len - 1;
    for (size_t i = 0; i < n; i++) buf[i] = (char)tolower((unsigned char)text[i]);
    buf[n] = '\0';
    return buf;
}

int settings_from_env(struct enclave_settings *s, char *err, size_t errlen)
{
    if (size_setting("SCONE_HEAP", "heap", DEFAULT_HEAP, MAX_HEAP, &s->heap, err, errlen) < 0) return -1;
    if (size_setting("SCONE_STACK", "stack", DEFAULT_STACK, MAX_STACK, &s->stack, err, errlen) < 0) return -1;

    const char *text = getenv("SCONE_THREADS");
    s->threads = DEFAULT_THREADS;
    if (text && *text) {
        char buf[64];
        trimmed_lower(text, buf, sizeof buf);
        char *end = NULL;
        unsigned long long n = 0;
        int ok = buf[0] != '\0' && isdigit((unsigned char)buf[0]);
        if (ok) {
            n = strtoull(buf, &end, 10);
            ok = *end == '\0';
        }
        if (!ok) {
            message(err, errlen, "SCONE_THREADS '%s' is not a whole number; give a thread count such as 8", text);
            return -1;
        }
        if (n < 1 || n > MAX_THREADS) {
            message(err, errlen, "SCONE_THREADS '%s' is outside 1..%d; give a count in that range", text,
                    MAX_THREADS);
            return -1;
        }
        s->threads = (uint32_t)n;
    }

    text = getenv("SCONE_ALLOW_DLOPEN");
    s->dlopen = 0;
    if (text && *text) {
        static const char *const names[] = {"off", "protected", "unprotected"};
        char buf[32];
        trimmed_lower(text, buf, sizeof buf);
        int found = -1;
        for (int i = 0; i < 3; i++) {
            char digit[2] = {(char)('0' + i), '\0'};
            if (!strcmp(buf, names[i]) || !strcmp(buf, digit)) found = i;
        }
        if (found < 0) {
            message(err, errlen,
                    "SCONE_ALLOW_DLOPEN '%s' is not known; use off (0), protected (1) or unprotected (2)", text);
            return -1;
        }
        s->dlopen = (uint32_t)found;
    }

    text = getenv("SCONE_DEBUG");
    s->debug = 0;
    if (text && *text) {
        char buf[8];
        trimmed_lower(text, buf, sizeof buf);
        if (!strcmp(buf, "1")) s->debug = 1;
        else if (strcmp(buf, "0") != 0) {
            message(err, errlen, "SCONE_DEBUG '%s' is neither 0 nor 1; set 1 for a debug enclave, 0 otherwise", text);
            return -1;
        }
    }
    return 0;
}
