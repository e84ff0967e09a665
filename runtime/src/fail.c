/* One-line refusals on stderr: "sconify-run: <cause>", with control characters escaped. */
#include "fail.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define MESSAGE_MAX 4096

void message(char *buf, unsigned long size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, size, fmt, ap);
    va_end(ap);
}

void fail(int code, const char *fmt, ...)
{
    char raw[MESSAGE_MAX];
    char line[MESSAGE_MAX * 4 + 32];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(raw, sizeof raw, fmt, ap);
    va_end(ap);

    /* Paths and session values can hold newlines: escape them so that a refusal stays one line. */
    size_t n = 0;
    const char *prefix = "sconify-run: ";
    memcpy(line, prefix, strlen(prefix));
    n = strlen(prefix);
    for (const unsigned char *p = (const unsigned char *)raw; *p; p++) {
        if (*p < 0x20 || *p == 0x7f) {
            n += (size_t)snprintf(line + n, sizeof line - n, "\\x%02x", *p);
        } else {
            line[n++] = (char)*p;
        }
    }
    line[n++] = '\n';
    /* One write, so that the line is not interleaved with the output of other processes. */
    ssize_t ignored = write(STDERR_FILENO, line, n);
    (void)ignored;
    _exit(code);
}
