/*
 * Fetching the configuration from sconify's development CAS (docs/cas.md): one POST /v1/configs with the
 * configuration id and the measurement, over a unix socket (plain HTTP; the socket's directory is the access
 * control) or, when built with SCONIFY_RUN_TLS and OpenSSL's libssl, over HTTPS to a loopback address with the
 * CAS's certificate pinned by SCONIFY_CAS_CA. The answer has the fields of a session's service, plus the files
 * to inject and the volumes; the files are written just before the launch.
 */
#include "cas.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "fail.h"
#include "util.h"

#ifdef SCONIFY_RUN_TLS
#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#endif

#define ANSWER_MAX (16u << 20)

int cas_is_dev(const char *address)
{
    return address && (!strncmp(address, "unix:", 5) || !strncmp(address, "https://", 8));
}

/* The id travels inside a JSON string: allow only what a session and service name can hold. */
static void check_config_id(const char *id)
{
    for (const char *p = id; *p; p++) {
        char c = *p;
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' ||
              c == '-' || c == '/'))
            fail(EXIT_BAD_CONFIG, "SCONE_CONFIG_ID '%s' has a character a session or service name cannot have", id);
    }
}

struct answer {
    unsigned char *data;
    size_t length;
};

static void append(struct answer *a, const unsigned char *buf, size_t n, const char *address)
{
    if (a->length + n > ANSWER_MAX) fail(EXIT_BAD_SESSION, "the CAS at %s answered more than 16 MiB", address);
    a->data = xrealloc(a->data, a->length + n + 1);
    memcpy(a->data + a->length, buf, n);
    a->length += n;
    a->data[a->length] = 0;
}

static void write_all(int fd, const char *data, size_t n, const char *address)
{
    while (n) {
        ssize_t w = write(fd, data, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) fail(EXIT_NO_SESSION, "cannot send to the CAS at %s: %s", address, strerror(errno));
        data += w;
        n -= (size_t)w;
    }
}

static struct answer exchange_unix(const char *address, const char *request, size_t request_length)
{
    const char *path = address + 5;
    struct sockaddr_un sun;
    memset(&sun, 0, sizeof sun);
    sun.sun_family = AF_UNIX;
    if (!*path || strlen(path) >= sizeof sun.sun_path)
        fail(EXIT_BAD_CONFIG, "SCONE_CAS_ADDR '%s' is not unix:/PATH with a path of at most %zu bytes", address,
             sizeof sun.sun_path - 1);
    memcpy(sun.sun_path, path, strlen(path));
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) fail(EXIT_INTERNAL, "cannot create a socket: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&sun, sizeof sun) < 0)
        fail(EXIT_NO_SESSION, "no session: the CAS at %s cannot be reached (%s); start `sconify cas serve --unix` "
             "and share its socket with the container", address, strerror(errno));
    write_all(fd, request, request_length, address);
    struct answer a = {0};
    unsigned char buf[65536];
    for (;;) {
        ssize_t r = read(fd, buf, sizeof buf);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) fail(EXIT_NO_SESSION, "cannot read the answer of the CAS at %s: %s", address, strerror(errno));
        if (r == 0) break;
        append(&a, buf, (size_t)r, address);
    }
    close(fd);
    return a;
}

#ifdef SCONIFY_RUN_TLS
static struct answer exchange_tls(const char *address, const char *request, size_t request_length)
{
    /* https://IPV4:PORT only: no name resolution in a static launcher, and the CAS listens on loopback. */
    char host[64];
    const char *rest = address + 8, *colon = strrchr(rest, ':');
    size_t hlen = colon ? (size_t)(colon - rest) : 0;
    long port = colon ? strtol(colon + 1, NULL, 10) : 0;
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    if (!hlen || hlen >= sizeof host || port <= 0 || port > 65535)
        fail(EXIT_BAD_CONFIG, "SCONE_CAS_ADDR '%s' is not https://IP:PORT", address);
    memcpy(host, rest, hlen);
    host[hlen] = 0;
    if (inet_pton(AF_INET, host, &sin.sin_addr) != 1)
        fail(EXIT_BAD_CONFIG, "SCONE_CAS_ADDR '%s' names no IPv4 address; give the CAS's address as a number", address);
    sin.sin_port = htons((unsigned short)port);
    const char *ca = getenv("SCONIFY_CAS_CA");
    if (!ca || !*ca)
        fail(EXIT_BAD_CONFIG, "SCONIFY_CAS_CA is not set; mount the development CAS's cas.crt and name it, so that "
             "the runtime knows whom it talks to");

    OPENSSL_init_ssl(OPENSSL_INIT_NO_LOAD_CONFIG, NULL);
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) fail(EXIT_INTERNAL, "cannot create a TLS context");
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1)
        fail(EXIT_BAD_CONFIG, "SCONIFY_CAS_CA %s is not a readable PEM certificate", ca);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) fail(EXIT_INTERNAL, "cannot create a socket: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&sin, sizeof sin) < 0)
        fail(EXIT_NO_SESSION, "no session: the CAS at %s cannot be reached (%s); is `sconify cas serve` running?",
             address, strerror(errno));
    SSL *ssl = SSL_new(ctx);
    if (!ssl) fail(EXIT_INTERNAL, "cannot create a TLS connection");
    X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), host);
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) != 1) {
        long verify = SSL_get_verify_result(ssl);
        unsigned long err = ERR_peek_last_error();
        const char *why = verify != X509_V_OK ? X509_verify_cert_error_string(verify)
                          : err ? ERR_reason_error_string(err) : NULL;
        fail(EXIT_NO_SESSION, "no session: the TLS handshake with the CAS at %s failed (%s); check SCONIFY_CAS_CA",
             address, why ? why : "no reason given");
    }
    size_t sent = 0;
    while (sent < request_length) {
        int w = SSL_write(ssl, request + sent, (int)(request_length - sent));
        if (w <= 0) fail(EXIT_NO_SESSION, "cannot send to the CAS at %s", address);
        sent += (size_t)w;
    }
    struct answer a = {0};
    unsigned char buf[16384];
    for (;;) {
        int r = SSL_read(ssl, buf, sizeof buf);
        if (r <= 0) break;
        append(&a, buf, (size_t)r, address);
    }
    SSL_free(ssl);
    SSL_CTX_free(ctx);
    close(fd);
    return a;
}
#endif

void cas_fetch(const char *address, const char *config_id, const char *mrenclave, struct service_config *out,
               struct cas_extras *extra)
{
    check_config_id(config_id);
    char body[1024], request[1400];
    int blen = snprintf(body, sizeof body, "{\"config_id\": \"%s\", \"mrenclave\": \"%s\"}", config_id, mrenclave);
    if (blen < 0 || (size_t)blen >= sizeof body) fail(EXIT_BAD_CONFIG, "SCONE_CONFIG_ID is too long");
    int rlen = snprintf(request, sizeof request,
                        "POST /v1/configs HTTP/1.0\r\nHost: cas\r\nContent-Type: application/json\r\n"
                        "Content-Length: %d\r\nConnection: close\r\n\r\n%s", blen, body);
    struct answer a;
    if (!strncmp(address, "unix:", 5)) {
        a = exchange_unix(address, request, (size_t)rlen);
    } else {
#ifdef SCONIFY_RUN_TLS
        a = exchange_tls(address, request, (size_t)rlen);
#else
        fail(EXIT_BAD_CONFIG, "SCONE_CAS_ADDR '%s': this runtime was built without TLS; share the development CAS's "
             "unix socket and set SCONE_CAS_ADDR=unix:/PATH", address);
#endif
    }
    if (!a.data || a.length < 12 || memcmp(a.data, "HTTP/1.", 7) != 0)
        fail(EXIT_NO_SESSION, "no session: the CAS at %s gave no HTTP answer", address);
    int status = atoi((const char *)a.data + 9);
    unsigned char *start = (unsigned char *)strstr((const char *)a.data, "\r\n\r\n");
    if (!start) fail(EXIT_NO_SESSION, "no session: the CAS at %s gave an incomplete answer", address);
    start += 4;
    size_t length = a.length - (size_t)(start - a.data);
    if (status == 403)
        fail(EXIT_MEASUREMENT, "the CAS at %s refused configuration %s: this enclave measures %s, which the session "
             "does not allow", address, config_id, mrenclave);
    if (status == 404)
        fail(EXIT_NO_SERVICE, "the CAS at %s has no configuration %s (SCONE_CONFIG_ID); push the session written for "
             "this image", address, config_id);
    if (status != 200) fail(EXIT_NO_SESSION, "no session: the CAS at %s answered with status %d", address, status);
    session_from_cas(start, length, address, out, extra);
    OPENSSL_cleanse(a.data, a.length); /* the answer held the file-system key and secrets */
    free(a.data);
}

static void make_dirs(const char *path, mode_t mode, const struct user *user, int chown_last)
{
    char *copy = xstrdup(path);
    for (char *p = copy + 1;; p++) {
        if (*p != '/' && *p) continue;
        char saved = *p;
        *p = 0;
        if (mkdir(copy, mode) == 0) {
            if (chown_last && !saved && user->given && chown(copy, user->uid, user->gid) < 0)
                fail(EXIT_READ_ONLY, "cannot give %s to the image's user: %s", copy, strerror(errno));
        } else if (errno != EEXIST) {
            fail(EXIT_READ_ONLY, "cannot create the directory %s for the configuration from the CAS: %s", copy,
                 strerror(errno));
        }
        *p = saved;
        if (!saved) break;
    }
    free(copy);
}

void cas_write_files(const struct cas_extras *extra, const struct user *user)
{
    for (size_t i = 0; i < extra->volume_count; i++) make_dirs(extra->volume_paths[i], 0700, user, 1);
    for (size_t i = 0; i < extra->file_count; i++) {
        const struct injected_file *f = &extra->files[i];
        char *parent = xstrdup(f->path);
        char *slash = strrchr(parent, '/');
        if (slash && slash != parent) {
            *slash = 0;
            make_dirs(parent, 0755, user, 0);
        }
        free(parent);
        /* A new file, not the one an earlier start left (which may since have become a link to another). */
        if (unlink(f->path) < 0 && errno != ENOENT)
            fail(EXIT_READ_ONLY, "cannot replace %s with the injected file: %s; remove what is there", f->path,
                 strerror(errno));
        int fd = open(f->path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd < 0)
            fail(EXIT_READ_ONLY, "cannot write the injected file %s: %s; give the container a writable file system",
                 f->path, strerror(errno));
        if (fchmod(fd, 0600) < 0 || (user->given && fchown(fd, user->uid, user->gid) < 0))
            fail(EXIT_READ_ONLY, "cannot make the injected file %s private to the image's user: %s", f->path,
                 strerror(errno));
        size_t done = 0;
        while (done < f->length) {
            ssize_t w = write(fd, f->content + done, f->length - done);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) fail(EXIT_READ_ONLY, "cannot write the injected file %s: %s", f->path, strerror(errno));
            done += (size_t)w;
        }
        close(fd);
        OPENSSL_cleanse(f->content, f->length);
    }
}
