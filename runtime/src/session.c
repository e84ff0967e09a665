/*
 * Reading a CAS session file (YAML, session language v0.3) with libyaml's document loader.
 *
 * Only what the launcher needs is read: the top-level `name` and `version`, and from the service whose
 * `name` matches, `mrenclaves`, `command`, `environment`, `pwd` and `fspf_path`/`fspf_key`/`fspf_tag`.
 * Other keys (`access_policy`, `images`, `volumes`, `secrets`, `security`, ...) are ignored.
 */
#include "session.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <openssl/evp.h>
#include <yaml.h>

#include "fail.h"
#include "util.h"

#define SESSION_MAX (16u << 20)

static const char *session_path;
static const char *cas_origin; /* set while reading an answer of the development CAS */

static _Noreturn void malformed(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static _Noreturn void malformed(const char *fmt, ...)
{
    char what[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (cas_origin)
        fail(EXIT_BAD_SESSION, "the configuration from the CAS at %s is malformed: %s; run the CAS of this sconify",
             cas_origin, what);
    fail(EXIT_BAD_SESSION, "the session file %s is malformed: %s; mount the session file written by sconify convert",
         session_path, what);
}

static yaml_node_t *node(yaml_document_t *doc, int id)
{
    return yaml_document_get_node(doc, id);
}

/* The text of a scalar node; a scalar with a NUL byte is refused (it cannot be an argument or a path). */
static const char *scalar(yaml_node_t *n, const char *what, const char *where)
{
    if (!n || n->type != YAML_SCALAR_NODE) malformed("%s of %s is not a string", what, where);
    if (memchr(n->data.scalar.value, '\0', n->data.scalar.length))
        malformed("%s of %s contains a NUL character", what, where);
    return (const char *)n->data.scalar.value;
}

/* The value for KEY in a mapping node, or NULL; a key given twice is refused. */
static yaml_node_t *lookup(yaml_document_t *doc, yaml_node_t *map, const char *key, const char *where)
{
    yaml_node_t *found = NULL;
    for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top; p++) {
        yaml_node_t *k = node(doc, p->key);
        if (k && k->type == YAML_SCALAR_NODE && !strcmp((const char *)k->data.scalar.value, key)) {
            if (found) malformed("%s has the key '%s' twice", where, key);
            found = node(doc, p->value);
        }
    }
    return found;
}

static int is_null(yaml_node_t *n)
{
    if (!n) return 1;
    if (n->type != YAML_SCALAR_NODE || n->data.scalar.style != YAML_PLAIN_SCALAR_STYLE) return 0;
    const char *v = (const char *)n->data.scalar.value;
    return !*v || !strcmp(v, "~") || !strcmp(v, "null") || !strcmp(v, "Null") || !strcmp(v, "NULL");
}

static int all_hex(const char *s, size_t length)
{
    if (strlen(s) != length) return 0;
    for (size_t i = 0; i < length; i++) {
        char c = s[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))) return 0;
    }
    return 1;
}

static char *lower_dup(const char *s)
{
    char *out = xstrdup(s);
    for (char *p = out; *p; p++) {
        if (*p >= 'A' && *p <= 'F') *p = (char)(*p - 'A' + 'a');
    }
    return out;
}

static void read_service(yaml_document_t *doc, yaml_node_t *svc, const char *where, struct service_config *out)
{
    yaml_node_t *n = lookup(doc, svc, "mrenclaves", where);
    if (is_null(n)) malformed("%s has no mrenclaves", where);
    if (n->type != YAML_SEQUENCE_NODE) malformed("mrenclaves of %s is not a list", where);
    size_t count = (size_t)(n->data.sequence.items.top - n->data.sequence.items.start);
    if (!count) malformed("%s lists no mrenclaves", where);
    out->mrenclaves = xcalloc(count, sizeof *out->mrenclaves);
    for (size_t i = 0; i < count; i++) {
        const char *hex = scalar(node(doc, n->data.sequence.items.start[i]), "an entry of mrenclaves", where);
        if (!all_hex(hex, 64)) malformed("the mrenclaves entry '%s' of %s is not 64 hex digits", hex, where);
        out->mrenclaves[out->mrenclave_count++] = lower_dup(hex);
    }

    n = lookup(doc, svc, "command", where);
    if (is_null(n)) malformed("%s has no command", where);
    out->command = xstrdup(scalar(n, "command", where));

    n = lookup(doc, svc, "environment", where);
    if (!is_null(n)) {
        if (n->type != YAML_MAPPING_NODE) malformed("environment of %s is not a mapping", where);
        size_t pairs = (size_t)(n->data.mapping.pairs.top - n->data.mapping.pairs.start);
        out->env_names = xcalloc(pairs, sizeof *out->env_names);
        out->env_values = xcalloc(pairs, sizeof *out->env_values);
        for (size_t i = 0; i < pairs; i++) {
            yaml_node_pair_t *p = &n->data.mapping.pairs.start[i];
            const char *name = scalar(node(doc, p->key), "a variable name in environment", where);
            if (!*name || strchr(name, '='))
                malformed("the environment variable name '%s' of %s is empty or contains '='", name, where);
            for (size_t j = 0; j < out->env_count; j++) {
                if (!strcmp(out->env_names[j], name)) malformed("environment of %s sets '%s' twice", where, name);
            }
            yaml_node_t *value = node(doc, p->value);
            out->env_names[out->env_count] = xstrdup(name);
            out->env_values[out->env_count] = xstrdup(is_null(value) ? "" : scalar(value, name, where));
            out->env_count++;
        }
    }

    n = lookup(doc, svc, "pwd", where);
    out->pwd = xstrdup(is_null(n) ? "/" : scalar(n, "pwd", where));
    if (out->pwd[0] != '/') malformed("pwd '%s' of %s is not an absolute path", out->pwd, where);

    yaml_node_t *path = lookup(doc, svc, "fspf_path", where);
    yaml_node_t *key = lookup(doc, svc, "fspf_key", where);
    yaml_node_t *tag = lookup(doc, svc, "fspf_tag", where);
    int given = !is_null(path) + !is_null(key) + !is_null(tag);
    if (given == 0) return;
    if (given != 3) malformed("%s gives only some of fspf_path, fspf_key and fspf_tag", where);
    out->fspf_path = xstrdup(scalar(path, "fspf_path", where));
    if (out->fspf_path[0] != '/') malformed("fspf_path '%s' of %s is not an absolute path", out->fspf_path, where);
    const char *k = scalar(key, "fspf_key", where);
    if (!all_hex(k, 64)) malformed("fspf_key of %s is not 64 hex digits", where);
    out->fspf_key = lower_dup(k);
    const char *t = scalar(tag, "fspf_tag", where);
    if (!all_hex(t, 32)) malformed("fspf_tag of %s is not 32 hex digits", where);
    out->fspf_tag = lower_dup(t);
}

void session_load(const char *path, const char *session, const char *service, struct service_config *out)
{
    session_path = path;
    memset(out, 0, sizeof *out);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT)
            fail(EXIT_NO_SESSION,
                 "no session: the session file %s (SCONIFY_SESSION_FILE) does not exist; mount it, e.g. docker run "
                 "-v $PWD/session.yml:%s:ro", path, path);
        fail(EXIT_NO_SESSION, "no session: the session file %s (SCONIFY_SESSION_FILE) cannot be opened (%s); "
             "mount it readable", path, strerror(errno));
    }
    unsigned char *data = NULL;
    size_t length = 0;
    int rc = read_fd(fd, SESSION_MAX, &data, &length);
    close(fd);
    if (rc == EFBIG) fail(EXIT_BAD_SESSION, "the session file %s is larger than 16 MiB; mount the session file "
                          "written by sconify convert", path);
    if (rc) fail(EXIT_NO_SESSION, "no session: the session file %s cannot be read (%s); mount a regular file",
                 path, strerror(rc));

    yaml_parser_t parser;
    yaml_document_t doc;
    if (!yaml_parser_initialize(&parser)) fail(EXIT_INTERNAL, "cannot initialise the YAML parser");
    yaml_parser_set_input_string(&parser, data, length);
    if (!yaml_parser_load(&parser, &doc)) {
        char where[128];
        message(where, sizeof where, "line %lu, column %lu", (unsigned long)parser.problem_mark.line + 1,
                (unsigned long)parser.problem_mark.column + 1);
        malformed("it is not valid YAML (%s at %s)", parser.problem ? parser.problem : "syntax error", where);
    }
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (!root) malformed("it is empty");
    if (root->type != YAML_MAPPING_NODE) malformed("it is not a YAML mapping");

    yaml_node_t *version = lookup(&doc, root, "version", "the session");
    if (!is_null(version)) {
        const char *v = scalar(version, "version", "the session");
        if (strcmp(v, "0.3") != 0 && strncmp(v, "0.3.", 4) != 0)
            fail(EXIT_BAD_SESSION, "the session file %s uses session language version %s; sconify-run reads "
                 "version 0.3, so convert the image again with this sconify", path, v);
    }
    yaml_node_t *name = lookup(&doc, root, "name", "the session");
    if (is_null(name)) malformed("it has no session name");
    const char *found = scalar(name, "name", "the session");
    if (strcmp(found, session) != 0)
        fail(EXIT_NO_SERVICE, "the session file %s holds session '%s', but SCONE_CONFIG_ID names session '%s'; "
             "mount the session written for this image", path, found, session);

    yaml_node_t *services = lookup(&doc, root, "services", "the session");
    if (is_null(services) || services->type != YAML_SEQUENCE_NODE)
        malformed("it has no list of services");
    yaml_node_t *match = NULL;
    for (yaml_node_item_t *i = services->data.sequence.items.start; i < services->data.sequence.items.top; i++) {
        yaml_node_t *svc = node(&doc, *i);
        if (!svc || svc->type != YAML_MAPPING_NODE) malformed("an entry of services is not a mapping");
        yaml_node_t *svc_name = lookup(&doc, svc, "name", "a service");
        if (is_null(svc_name)) continue;
        if (!strcmp(scalar(svc_name, "name", "a service"), service)) {
            if (match) malformed("it has two services named '%s'", service);
            match = svc;
        }
    }
    if (!match)
        fail(EXIT_NO_SERVICE, "the session '%s' in %s has no service '%s' (SCONE_CONFIG_ID); mount the session "
             "written for this image or set SCONE_CONFIG_ID to one of its services", session, path, service);
    char where[512];
    message(where, sizeof where, "service '%s'", service);
    read_service(&doc, match, where, out);
    yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
    free(data);
}

/* Decode standard base64 (EVP_DecodeBlock counts the padding as zero bytes; they are taken off again). */
static unsigned char *base64_decode(const char *text, size_t *length, const char *where)
{
    size_t n = strlen(text);
    if (n % 4 || n > (size_t)1 << 30) malformed("content_base64 of %s is not base64", where);
    unsigned char *out = xmalloc(n / 4 * 3 + 1);
    int got = n ? EVP_DecodeBlock(out, (const unsigned char *)text, (int)n) : 0;
    if (got < 0) malformed("content_base64 of %s is not base64", where);
    size_t pad = (n && text[n - 1] == '=') + (n > 1 && text[n - 2] == '=');
    *length = (size_t)got - pad;
    return out;
}

/* An absolute path without '..' components (the CAS is trusted, but a path is checked like any other input). */
static const char *clean_path(yaml_document_t *doc, yaml_node_t *map, const char *key, const char *where)
{
    const char *p = scalar(lookup(doc, map, key, where), key, where);
    if (p[0] != '/' || strstr(p, "/../") || !strcmp(p + strlen(p) - (strlen(p) >= 3 ? 3 : 0), "/.."))
        malformed("%s '%s' of %s is not a clean absolute path", key, p, where);
    return p;
}

void session_from_cas(const unsigned char *data, size_t length, const char *origin, struct service_config *out,
                      struct cas_extras *extra)
{
    cas_origin = origin;
    memset(out, 0, sizeof *out);
    memset(extra, 0, sizeof *extra);
    yaml_parser_t parser;
    yaml_document_t doc;
    if (!yaml_parser_initialize(&parser)) fail(EXIT_INTERNAL, "cannot initialise the YAML parser");
    yaml_parser_set_input_string(&parser, data, length);
    if (!yaml_parser_load(&parser, &doc)) malformed("it is not JSON (%s)", parser.problem ? parser.problem : "syntax");
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (!root || root->type != YAML_MAPPING_NODE) malformed("it is not a JSON object");
    read_service(&doc, root, "the service", out);

    yaml_node_t *files = lookup(&doc, root, "injection_files", "the answer");
    if (!is_null(files)) {
        if (files->type != YAML_SEQUENCE_NODE) malformed("injection_files is not a list");
        size_t count = (size_t)(files->data.sequence.items.top - files->data.sequence.items.start);
        extra->files = xcalloc(count, sizeof *extra->files);
        for (size_t i = 0; i < count; i++) {
            yaml_node_t *f = node(&doc, files->data.sequence.items.start[i]);
            if (!f || f->type != YAML_MAPPING_NODE) malformed("an injection file is not an object");
            struct injected_file *file = &extra->files[extra->file_count++];
            file->path = xstrdup(clean_path(&doc, f, "path", "an injection file"));
            file->content = base64_decode(scalar(lookup(&doc, f, "content_base64", file->path), "content_base64",
                                                 file->path), &file->length, file->path);
        }
    }
    yaml_node_t *volumes = lookup(&doc, root, "volumes", "the answer");
    if (!is_null(volumes)) {
        if (volumes->type != YAML_SEQUENCE_NODE) malformed("volumes is not a list");
        size_t count = (size_t)(volumes->data.sequence.items.top - volumes->data.sequence.items.start);
        extra->volume_paths = xcalloc(count, sizeof *extra->volume_paths);
        for (size_t i = 0; i < count; i++) {
            yaml_node_t *v = node(&doc, volumes->data.sequence.items.start[i]);
            if (!v || v->type != YAML_MAPPING_NODE) malformed("a volume is not an object");
            extra->volume_paths[extra->volume_count++] = xstrdup(clean_path(&doc, v, "path", "a volume"));
        }
    }
    yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
    cas_origin = NULL;
}
