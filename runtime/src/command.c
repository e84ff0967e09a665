/* Splitting the session's command with shlex rules, and SCONE's @@N host-argument forwarding. */
#include "command.h"

#include <stdlib.h>
#include <string.h>

#include "fail.h"
#include "util.h"

struct words {
    char **items;
    size_t count, cap;
};

struct text {
    char *data;
    size_t len, cap;
};

static void text_add(struct text *t, const char *s, size_t n)
{
    if (t->len + n + 1 > t->cap) {
        t->cap = (t->len + n + 1) * 2;
        t->data = xrealloc(t->data, t->cap);
    }
    memcpy(t->data + t->len, s, n);
    t->len += n;
    t->data[t->len] = '\0';
}

static void words_add(struct words *w, char *word)
{
    if (w->count + 2 > w->cap) {
        w->cap = (w->count + 2) * 2;
        w->items = xrealloc(w->items, w->cap * sizeof *w->items);
    }
    w->items[w->count++] = word;
    w->items[w->count] = NULL;
}

static int is_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

char **split_command(const char *command, size_t *count, char *err, size_t errlen)
{
    struct words words = {0};
    words_add(&words, NULL);
    words.count = 0;
    const char *p = command;
    for (;;) {
        while (is_blank(*p)) p++;
        if (!*p) break;
        struct text word = {0};
        text_add(&word, "", 0);
        /* One word: runs of plain characters, quoted parts and escapes until unquoted whitespace. */
        while (*p && !is_blank(*p)) {
            if (*p == '\'') {
                const char *close = strchr(p + 1, '\'');
                if (!close) {
                    message(err, errlen, "the command has a single quote without its closing quote");
                    free(word.data);
                    return NULL;
                }
                text_add(&word, p + 1, (size_t)(close - p - 1));
                p = close + 1;
            } else if (*p == '"') {
                p++;
                for (;;) {
                    if (!*p) {
                        message(err, errlen, "the command has a double quote without its closing quote");
                        free(word.data);
                        return NULL;
                    }
                    if (*p == '"') {
                        p++;
                        break;
                    }
                    if (*p == '\\') {
                        if (!p[1]) {
                            message(err, errlen, "the command has a double quote without its closing quote");
                            free(word.data);
                            return NULL;
                        }
                        /* Inside double quotes a backslash escapes only '"' and itself. */
                        if (p[1] != '"' && p[1] != '\\') text_add(&word, p, 1);
                        text_add(&word, p + 1, 1);
                        p += 2;
                        continue;
                    }
                    text_add(&word, p, 1);
                    p++;
                }
            } else if (*p == '\\') {
                if (!p[1]) {
                    message(err, errlen, "the command ends with a backslash that escapes nothing");
                    free(word.data);
                    return NULL;
                }
                text_add(&word, p + 1, 1);
                p += 2;
            } else {
                text_add(&word, p, 1);
                p++;
            }
        }
        words_add(&words, word.data);
    }
    *count = words.count;
    return words.items;
}

/* The number N of a placeholder "@@N" at P (N >= 1, digits as many as follow), its length in LEN; 0 if none. */
static size_t placeholder(const char *p, size_t *len)
{
    if (p[0] != '@' || p[1] != '@' || p[2] < '1' || p[2] > '9') return 0;
    size_t n = 0, i = 2;
    while (p[i] >= '0' && p[i] <= '9') {
        if (n < 100000000) n = n * 10 + (size_t)(p[i] - '0');
        i++;
    }
    *len = i;
    return n;
}

char **apply_host_arguments(char **argv, size_t count, char **host, size_t host_count, char *err, size_t errlen)
{
    size_t highest = 0;
    for (size_t i = 0; i < count; i++) {
        for (const char *p = argv[i]; *p; p++) {
            size_t len, n = placeholder(p, &len);
            if (n > highest) highest = n;
            if (n) p += len - 1;
        }
    }
    if (host_count > highest) {
        if (highest == 0)
            message(err, errlen,
                    "host arguments refused: the session's command takes no arguments from the host, but %zu %s "
                    "given (the first is '%s'); start the container without arguments after the image name, or "
                    "convert it with @@1, @@2, ... placeholders in the command",
                    host_count, host_count == 1 ? "was" : "were", host[0]);
        else
            message(err, errlen,
                    "host arguments refused: the session's command takes at most %zu arguments from the host "
                    "(@@1..@@%zu), but %zu were given; drop '%s' and what follows", highest, highest, host_count,
                    host[highest]);
        return NULL;
    }
    struct words out = {0};
    words_add(&out, NULL);
    out.count = 0;
    for (size_t i = 0; i < count; i++) {
        size_t len, n = placeholder(argv[i], &len);
        if (n && argv[i][len] == '\0') {
            /* A word that is only a placeholder: the argument itself, or no word at all. */
            if (n <= host_count) words_add(&out, xstrdup(host[n - 1]));
            continue;
        }
        struct text word = {0};
        text_add(&word, "", 0);
        for (const char *p = argv[i]; *p;) {
            n = placeholder(p, &len);
            if (n) {
                if (n <= host_count) text_add(&word, host[n - 1], strlen(host[n - 1]));
                p += len;
            } else {
                text_add(&word, p, 1);
                p++;
            }
        }
        words_add(&out, word.data);
    }
    return out.items;
}
