/*
 * The runtime's FSPF reader: the C twin of sconify/fspf/reader.py and volume.py, for the volume "/".
 *
 * 1. The metadata opens with the key (key id, AES-256-GCM tag) and its tag equals the session's.
 * 2. One walk over the protected part of the tree, without following symlinks, checks every path against
 *    its record (type, link target, device, size, every chunk) and finds paths the metadata does not list.
 *    Encrypted files are decrypted into temporary files next to them on the way.
 * 3. Only when everything verified are the temporary files renamed over the ciphertext; on any refusal
 *    they are removed, so a refused start leaves no plaintext behind.
 *
 * A container that is started again finds its files already decrypted: a chunk of an encrypted file is
 * also accepted as its own plaintext when sealing it again under the recorded nonce gives the recorded
 * tag, which only the authentic plaintext does.
 */
#include "fspf.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include "fail.h"
#include "util.h"

#define HEADER_SIZE 64
#define TAG_SIZE 16
#define NONCE_SIZE 12
#define KEY_ID_SIZE 16
#define ENTRY_SIZE (NONCE_SIZE + TAG_SIZE)
#define MIN_CHUNK (4u << 10)
#define MAX_CHUNK (16u << 20)
#define BATCH_BYTES (1u << 20)
#define METADATA_MAX (1ull << 32)
#define MAX_DEPTH 512

enum { MODE_NOT_PROTECTED = 0, MODE_AUTHENTICATED = 1, MODE_ENCRYPTED = 2 };
enum { KIND_FILE = 1, KIND_DIRECTORY = 2, KIND_SYMLINK = 3, KIND_HARDLINK = 4, KIND_SPECIAL = 5 };

struct region {
    uint8_t mode;
    const char *prefix; /* NUL-terminated copy */
    size_t len;
};

struct record {
    uint8_t kind, protection;
    uint32_t st_mode, uid, gid;
    int64_t mtime_ns;
    char *path;
    size_t path_len;
    uint32_t xattr_count;
    const unsigned char *xattrs; /* the encoded (name, value) pairs inside the body */
    uint64_t size;
    const unsigned char *chunks;
    char *target;
    size_t target_len;
    uint32_t devmajor, devminor;
    size_t content; /* index of the FILE record holding the content (itself, or a hard link's file) */
    int seen;
};

/* A decrypted file waiting in its temporary file, or a hard link to make again. */
struct pending {
    size_t record;
    char *dir;  /* the parent directory's path */
    char *name; /* the final name in it */
    char *temp; /* the temporary name, NULL for a hard link to remake */
};

/* A directory whose timestamps change when temporary files come and go, to be put back. */
struct touched_dir {
    char *path;
    struct timespec times[2];
};

struct volume {
    uint32_t chunk_size;
    unsigned char prk[32];
    struct region *regions;
    size_t region_count;
    struct record *records;
    size_t record_count;
    const char *metadata_path;
    int root_fd;
    unsigned char *in, *out, *scratch;
    size_t batch;
    EVP_CIPHER_CTX *open_ctx, *seal_ctx;
    struct pending *pending;
    size_t pending_count, pending_cap;
    struct touched_dir *dirs;
    size_t dir_count, dir_cap;
    unsigned temp_counter;
    int root; /* running as root: decrypted files get their recorded owner */
    struct fspf_summary *summary;
    const struct fspf_expected *expected;
};

static struct volume *active; /* for removing temporary files on a refusal */

static int open_dir(const struct volume *v, const char *path);

/* -- refusing ----------------------------------------------------------------------------------------- */

static void remove_temporaries(void)
{
    if (!active) return;
    for (size_t i = 0; i < active->pending_count; i++) {
        struct pending *p = &active->pending[i];
        if (!p->temp) continue;
        int dfd = open_dir(active, p->dir);
        if (dfd >= 0) {
            unlinkat(dfd, p->temp, 0);
            close(dfd);
        }
    }
    active->pending_count = 0;
}

#define REFUSE(code, ...)           \
    do {                            \
        remove_temporaries();       \
        fail(code, __VA_ARGS__);    \
    } while (0)

static _Noreturn void problem(const char *path, const char *kind, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static _Noreturn void problem(const char *path, const char *kind, const char *fmt, ...)
{
    char detail[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    REFUSE(EXIT_PROTECTION,
           "protection check failed: %s %s (%s); the image's protected files were changed after conversion, so "
           "it does not start (use the image and session from one conversion)", path, detail, kind);
}

static _Noreturn void malformed_body(const char *what)
{
    REFUSE(EXIT_PROTECTION, "protection check failed: the metadata file is authentic but malformed (%s); convert "
           "the image again", what);
}

/* -- keys ------------------------------------------------------------------------------------------------ */

static void hkdf_expand(const unsigned char prk[32], const unsigned char *info, size_t info_len, unsigned char *out,
                        size_t len)
{
    unsigned char t[32];
    size_t have = 0, tlen = 0;
    unsigned char *msg = xmalloc(32 + info_len + 1);
    for (unsigned char i = 1; have < len; i++) {
        memcpy(msg, t, tlen);
        memcpy(msg + tlen, info, info_len);
        msg[tlen + info_len] = i;
        unsigned int n = 0;
        if (!HMAC(EVP_sha256(), prk, 32, msg, tlen + info_len + 1, t, &n) || n != 32)
            fail(EXIT_INTERNAL, "HMAC-SHA256 failed");
        tlen = 32;
        size_t take = len - have < 32 ? len - have : 32;
        memcpy(out + have, t, take);
        have += take;
    }
    OPENSSL_cleanse(t, sizeof t);
    free(msg);
}

static void file_key(const struct volume *v, const struct record *content, unsigned char key[32])
{
    size_t n = 4 + 1 + 4 + content->path_len;
    unsigned char *info = xmalloc(n);
    memcpy(info, "file", 4);
    info[4] = content->protection;
    put_u32(info + 5, (uint32_t)content->path_len);
    memcpy(info + 9, content->path, content->path_len);
    unsigned char material[64];
    hkdf_expand(v->prk, info, n, material, sizeof material);
    memcpy(key, material, 32);
    OPENSSL_cleanse(material, sizeof material);
    free(info);
}

/* -- regions and records ----------------------------------------------------------------------------------- */

static int is_below(const char *path, size_t len, const char *prefix, size_t plen)
{
    if (plen == 1) return 1; /* "/" */
    if (len < plen || memcmp(path, prefix, plen) != 0) return 0;
    return len == plen || path[plen] == '/';
}

static uint8_t mode_for(const struct volume *v, const char *path, size_t len)
{
    uint8_t mode = v->regions[0].mode;
    size_t best = 1;
    for (size_t i = 1; i < v->region_count; i++) {
        const struct region *r = &v->regions[i];
        if (r->len > best && is_below(path, len, r->prefix, r->len)) {
            best = r->len;
            mode = r->mode;
        }
    }
    return mode;
}

static int protected_at_or_below(const struct volume *v, const char *path, size_t len)
{
    if (mode_for(v, path, len) != MODE_NOT_PROTECTED) return 1;
    for (size_t i = 0; i < v->region_count; i++) {
        if (v->regions[i].mode != MODE_NOT_PROTECTED && is_below(v->regions[i].prefix, v->regions[i].len, path, len))
            return 1;
    }
    return 0;
}

/* A directory the container runtime must create to mount a not-protected path inside it (/etc for /etc/hosts). */
static int holds_runtime_mount(const struct volume *v, const char *path, size_t len)
{
    for (size_t i = 1; i < v->region_count; i++) {
        const struct region *r = &v->regions[i];
        if (r->mode == MODE_NOT_PROTECTED && r->len > len && is_below(r->prefix, r->len, path, len)) return 1;
    }
    return 0;
}

static int compare_paths(const char *a, size_t alen, const char *b, size_t blen)
{
    int c = memcmp(a, b, alen < blen ? alen : blen);
    if (c) return c;
    return alen < blen ? -1 : alen > blen;
}

static struct record *find_record(const struct volume *v, const char *path, size_t len)
{
    size_t lo = 0, hi = v->record_count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = compare_paths(v->records[mid].path, v->records[mid].path_len, path, len);
        if (c == 0) return &v->records[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

/* Whether some record lies below PATH: PATH is then a parent a layer may have left implicit (fspf.md 6.4). */
static int has_record_below(const struct volume *v, const char *path, size_t len)
{
    char *prefix = xmalloc(len + 2);
    memcpy(prefix, path, len);
    prefix[len] = '/';
    size_t lo = 0, hi = v->record_count;
    while (lo < hi) { /* the first record not below PREFIX in sorted order; those with the prefix follow it */
        size_t mid = lo + (hi - lo) / 2;
        if (compare_paths(v->records[mid].path, v->records[mid].path_len, prefix, len + 1) < 0) lo = mid + 1;
        else hi = mid;
    }
    int below = lo < v->record_count && v->records[lo].path_len > len + 1 &&
                memcmp(v->records[lo].path, prefix, len + 1) == 0;
    free(prefix);
    return below;
}

/* A volume path is normalised: "/" then components that are not empty, "." or "..", no trailing "/". */
static int normalised(const unsigned char *p, size_t len)
{
    if (len == 0 || p[0] != '/') return 0;
    if (len == 1) return 1;
    if (p[len - 1] == '/' || memchr(p, '\0', len)) return 0;
    size_t start = 1;
    for (size_t i = 1; i <= len; i++) {
        if (i == len || p[i] == '/') {
            size_t n = i - start;
            if (n == 0 || (n == 1 && p[start] == '.') || (n == 2 && p[start] == '.' && p[start + 1] == '.')) return 0;
            start = i + 1;
        }
    }
    return 1;
}

/* -- the metadata ------------------------------------------------------------------------------------------ */

struct cursor {
    const unsigned char *data;
    size_t len, pos;
};

static const unsigned char *take(struct cursor *c, size_t n)
{
    if (n > c->len - c->pos) malformed_body("it ends early");
    const unsigned char *p = c->data + c->pos;
    c->pos += n;
    return p;
}

static const unsigned char *bytes_field(struct cursor *c, size_t *len)
{
    *len = get_u32(take(c, 4));
    return take(c, *len);
}

static void parse_body(struct volume *v, const unsigned char *body, size_t len)
{
    struct cursor c = {body, len, 0};
    uint32_t region_count = get_u32(take(&c, 4));
    /* A region takes at least 9 bytes and a record at least 34 ("/a", a directory): larger counts cannot fit. */
    if (region_count == 0 || region_count > len / 8) malformed_body("the region table is empty or too long");
    v->regions = xcalloc(region_count, sizeof *v->regions);
    for (uint32_t i = 0; i < region_count; i++) {
        const unsigned char *fixed = take(&c, 4);
        size_t plen;
        const unsigned char *prefix = bytes_field(&c, &plen);
        if (fixed[0] > MODE_ENCRYPTED || !normalised(prefix, plen)) malformed_body("a region is invalid");
        struct region *r = &v->regions[v->region_count++];
        r->mode = fixed[0];
        r->prefix = xstrndup((const char *)prefix, plen);
        r->len = plen;
        int in_order = i == 0 ? plen == 1
                              : compare_paths(v->regions[i - 1].prefix, v->regions[i - 1].len, r->prefix, plen) < 0;
        if (!in_order)
            malformed_body("the region table is not sorted, not unique or has no root region");
    }
    uint64_t record_count = get_u64(take(&c, 8));
    if (record_count > (len - c.pos) / 34) malformed_body("the record count is impossible");
    v->records = xcalloc((size_t)record_count + 1, sizeof *v->records);
    for (uint64_t i = 0; i < record_count; i++) {
        struct record *r = &v->records[v->record_count];
        const unsigned char *fixed = take(&c, 24);
        r->kind = fixed[0];
        r->protection = fixed[1];
        if (r->kind < KIND_FILE || r->kind > KIND_SPECIAL || get_u16(fixed + 2))
            malformed_body("a record has an unknown kind");
        r->st_mode = get_u32(fixed + 4);
        r->uid = get_u32(fixed + 8);
        r->gid = get_u32(fixed + 12);
        r->mtime_ns = (int64_t)get_u64(fixed + 16);
        size_t plen;
        const unsigned char *path = bytes_field(&c, &plen);
        if (!normalised(path, plen) || plen == 1) malformed_body("a record path is not normalised");
        r->path = xstrndup((const char *)path, plen);
        r->path_len = plen;
        if (v->record_count &&
            compare_paths(v->records[v->record_count - 1].path, v->records[v->record_count - 1].path_len, r->path,
                          plen) >= 0)
            malformed_body("the records are not sorted or not unique");
        if (r->protection == MODE_NOT_PROTECTED || r->protection != mode_for(v, r->path, plen))
            malformed_body("a record does not have its region's protection");
        r->xattr_count = get_u32(take(&c, 4));
        r->xattrs = c.data + c.pos;
        for (uint32_t x = 0; x < r->xattr_count; x++) {
            size_t n;
            bytes_field(&c, &n);
            bytes_field(&c, &n);
        }
        if (r->kind == KIND_FILE) {
            r->size = get_u64(take(&c, 8));
            uint64_t chunks = r->size / v->chunk_size + (r->size % v->chunk_size != 0);
            if (chunks > (len - c.pos) / ENTRY_SIZE) malformed_body("it ends early");
            r->chunks = take(&c, (size_t)chunks * ENTRY_SIZE);
        } else if (r->kind == KIND_SYMLINK || r->kind == KIND_HARDLINK) {
            size_t tlen;
            const unsigned char *target = bytes_field(&c, &tlen);
            if (memchr(target, '\0', tlen)) malformed_body("a link target contains a NUL byte");
            r->target = xstrndup((const char *)target, tlen);
            r->target_len = tlen;
        } else if (r->kind == KIND_SPECIAL) {
            const unsigned char *dev = take(&c, 8);
            r->devmajor = get_u32(dev);
            r->devminor = get_u32(dev + 4);
        }
        v->record_count++;
    }
    if (c.pos != c.len) malformed_body("it has trailing bytes");
    for (size_t i = 0; i < v->record_count; i++) {
        struct record *r = &v->records[i];
        /* No record lies below a record that is not a directory. */
        for (size_t cut = r->path_len; cut > 1;) {
            while (cut > 0 && r->path[cut - 1] != '/') cut--;
            if (cut <= 1) break;
            cut--;
            struct record *above = find_record(v, r->path, cut);
            if (above && above->kind != KIND_DIRECTORY) malformed_body("a record lies below a non-directory");
        }
        r->content = i;
        if (r->kind == KIND_HARDLINK) {
            struct record *target = find_record(v, r->target, r->target_len);
            if (!target || target->kind != KIND_FILE || target->protection != r->protection)
                malformed_body("a hard link does not name a file of the same protection");
            r->content = (size_t)(target - v->records);
        }
    }
}

static void open_metadata(struct volume *v, const unsigned char key[32], const unsigned char expected[16],
                          unsigned char **body_out, size_t *body_len)
{
    const char *path = v->metadata_path;
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        REFUSE(EXIT_PROTECTION, "protection check failed: the metadata file %s (fspf_path) %s; use the image and "
               "session from one conversion", path, errno == ENOENT ? "is missing" : strerror(errno));
    unsigned char *data = NULL;
    size_t len = 0;
    int rc = read_fd(fd, METADATA_MAX, &data, &len);
    close(fd);
    if (rc) REFUSE(EXIT_PROTECTION, "protection check failed: the metadata file %s cannot be read (%s)", path,
                   strerror(rc));

    if (len < HEADER_SIZE + TAG_SIZE || memcmp(data, "SCNYFSPF", 8) != 0)
        REFUSE(EXIT_PROTECTION, "protection check failed: %s is not an FSPF metadata file (no SCNYFSPF header); "
               "use the image and session from one conversion", path);
    uint16_t version = get_u16(data + 8), suite = get_u16(data + 10);
    if (version != 1 || suite != 1)
        REFUSE(EXIT_PROTECTION, "protection check failed: %s uses FSPF format %u with cipher suite %u; this "
               "sconify-run reads format 1 suite 1 only, so use the runtime of the sconify that converted the "
               "image", path, version, suite);
    uint32_t chunk_size = get_u32(data + 12);
    uint64_t body = get_u64(data + 16);
    static const unsigned char zero[12];
    if (chunk_size < MIN_CHUNK || chunk_size > MAX_CHUNK || (chunk_size & (chunk_size - 1)) ||
        memcmp(data + 52, zero, 12) != 0)
        REFUSE(EXIT_PROTECTION, "protection check failed: %s has a malformed header; it was corrupted or tampered "
               "with", path);
    if (body > len || HEADER_SIZE + TAG_SIZE + body != len)
        REFUSE(EXIT_PROTECTION, "protection check failed: %s is %zu bytes but its header announces more or less; "
               "it was truncated, extended or tampered with", path, len);

    unsigned char prk[32], key_id[KEY_ID_SIZE];
    unsigned int n = 0;
    if (!HMAC(EVP_sha256(), "sconify-fspf v1", 15, key, 32, prk, &n)) fail(EXIT_INTERNAL, "HMAC-SHA256 failed");
    memcpy(v->prk, prk, 32);
    hkdf_expand(prk, (const unsigned char *)"key id", 6, key_id, KEY_ID_SIZE);
    if (CRYPTO_memcmp(key_id, data + 24, KEY_ID_SIZE) != 0) {
        char have[33], want[33];
        hex_encode(data + 24, KEY_ID_SIZE, have);
        hex_encode(key_id, KEY_ID_SIZE, want);
        REFUSE(EXIT_PROTECTION, "protection check failed: wrong key: the session's fspf_key does not open %s "
               "(key id %s, the session's key has id %s); mount the session from the same conversion as the image",
               path, have, want);
    }
    unsigned char material[64];
    hkdf_expand(prk, (const unsigned char *)"metadata", 8, material, sizeof material);
    unsigned char *plain = xmalloc((size_t)body + 1);
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int outl = 0, ok = ctx != NULL;
    ok = ok && EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) == 1;
    ok = ok && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, NONCE_SIZE, NULL) == 1;
    ok = ok && EVP_DecryptInit_ex(ctx, NULL, NULL, material, data + 40) == 1;
    if (!ok) fail(EXIT_INTERNAL, "AES-256-GCM is unavailable");
    int authentic = EVP_DecryptUpdate(ctx, NULL, &outl, data, HEADER_SIZE) == 1;
    size_t done = 0;
    while (authentic && done < body) {
        int step = body - done > (1u << 30) ? (1 << 30) : (int)(body - done);
        authentic = EVP_DecryptUpdate(ctx, plain + done, &outl, data + HEADER_SIZE + done, step) == 1;
        done += (size_t)step;
    }
    authentic = authentic &&
                EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_SIZE, data + HEADER_SIZE + body) == 1 &&
                EVP_DecryptFinal_ex(ctx, plain + done, &outl) == 1;
    EVP_CIPHER_CTX_free(ctx);
    OPENSSL_cleanse(material, sizeof material);
    OPENSSL_cleanse(prk, sizeof prk);
    if (!authentic)
        REFUSE(EXIT_PROTECTION, "protection check failed: the metadata file %s fails authentication under the "
               "session's key: it was corrupted or tampered with", path);
    const unsigned char *stored = data + HEADER_SIZE + body;
    if (CRYPTO_memcmp(stored, expected, TAG_SIZE) != 0) {
        char have[33], want[33];
        hex_encode(stored, TAG_SIZE, have);
        hex_encode(expected, TAG_SIZE, want);
        REFUSE(EXIT_PROTECTION, "protection check failed: tag mismatch: the metadata file %s is authentic but "
               "describes another state of the file system (tag %s, the session's fspf_tag is %s): an older or "
               "newer image, or a session from another conversion", path, have, want);
    }
    v->chunk_size = chunk_size;
    free(data);
    *body_out = plain;
    *body_len = (size_t)body;
}

/* -- checking one file -------------------------------------------------------------------------------------- */

struct frame {
    int fd;            /* the directory */
    const char *path;  /* its volume path */
    long touched;      /* index in v->dirs once a temporary file was made here, else -1 */
};

static void add_pending(struct volume *v, size_t record, const struct frame *dir, const char *name, char *temp)
{
    if (v->pending_count == v->pending_cap) {
        v->pending_cap = v->pending_cap ? 2 * v->pending_cap : 64;
        v->pending = xrealloc(v->pending, v->pending_cap * sizeof *v->pending);
    }
    struct pending *p = &v->pending[v->pending_count++];
    p->record = record;
    p->dir = xstrdup(dir->path);
    p->name = xstrdup(name);
    p->temp = temp;
}

static void touch_dir(struct volume *v, struct frame *dir)
{
    if (dir->touched >= 0) return;
    struct stat st;
    if (fstat(dir->fd, &st) < 0) fail(EXIT_INTERNAL, "cannot stat the directory %s: %s", dir->path, strerror(errno));
    if (v->dir_count == v->dir_cap) {
        v->dir_cap = v->dir_cap ? 2 * v->dir_cap : 16;
        v->dirs = xrealloc(v->dirs, v->dir_cap * sizeof *v->dirs);
    }
    struct touched_dir *t = &v->dirs[v->dir_count];
    t->path = xstrdup(dir->path);
    t->times[0] = st.st_atim;
    t->times[1] = st.st_mtim;
    dir->touched = (long)v->dir_count++;
}

static _Noreturn void cannot_write(const char *path, int err)
{
    if (err == EROFS)
        REFUSE(EXIT_READ_ONLY, "the file system of %s is read-only, so its encrypted files cannot be made readable "
               "in place; run the container without --read-only: sconify-run writes the plaintext of encrypted "
               "files into the container's writable layer", path);
    if (err == EACCES || err == EPERM)
        REFUSE(EXIT_READ_ONLY, "the encrypted files in %s cannot be made readable: permission denied; start the "
               "container as root (without --user): sconify-run switches to the image's user itself", path);
    REFUSE(EXIT_READ_ONLY, "the encrypted files in %s cannot be made readable: %s; give the container a writable "
           "layer with enough space", path, strerror(err));
}

/* Make the temporary file for NAME in DIR; its name starts with a dot and names sconify-run. */
static int make_temp(struct volume *v, struct frame *dir, const char *name, char **temp)
{
    touch_dir(v, dir);
    for (int attempt = 0; attempt < 1000; attempt++) {
        char buf[NAME_MAX + 1];
        if (strlen(name) < 180)
            snprintf(buf, sizeof buf, ".%s.sconify-run-%ld-%u", name, (long)getpid(), v->temp_counter++);
        else
            snprintf(buf, sizeof buf, ".sconify-run-%ld-%u", (long)getpid(), v->temp_counter++);
        int fd = openat(dir->fd, buf, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd >= 0) {
            *temp = xstrdup(buf);
            return fd;
        }
        if (errno != EEXIST) cannot_write(dir->path, errno);
    }
    cannot_write(dir->path, EEXIST);
}

static void write_all(int fd, const unsigned char *data, size_t n, off_t offset, const char *where)
{
    while (n) {
        ssize_t w = pwrite(fd, data, n, offset);
        if (w < 0) {
            if (errno == EINTR) continue;
            cannot_write(where, errno);
        }
        data += w;
        n -= (size_t)w;
        offset += w;
    }
}

static void set_xattrs(int fd, const struct record *r)
{
    struct cursor c = {r->xattrs, SIZE_MAX, 0};
    for (uint32_t i = 0; i < r->xattr_count; i++) {
        size_t nlen, vlen;
        const unsigned char *name = bytes_field(&c, &nlen);
        const unsigned char *value = bytes_field(&c, &vlen);
        char *n = xstrndup((const char *)name, nlen);
        /* Best effort, as `sconify fs decrypt`: some namespaces need privileges the container may lack. */
        if (fsetxattr(fd, n, value, vlen, 0) < 0) { /* ignored */ }
        free(n);
    }
}

static void chunk_failed(const struct volume *v, const char *path, uint64_t index, uint64_t size)
{
    uint64_t start = index * v->chunk_size;
    uint64_t end = (start + v->chunk_size < size ? start + v->chunk_size : size) - 1;
    problem(path, "tampered-chunk", "fails authentication in chunk %llu (bytes %llu-%llu): its bytes were changed, "
            "or it was moved from another position or another file", (unsigned long long)index,
            (unsigned long long)start, (unsigned long long)end);
}

/* Open chunk DATA[0:n] (ciphertext) into OUT; 1 if its tag verifies. */
static int open_chunk(struct volume *v, const unsigned char *entry, const unsigned char *data, size_t n,
                      unsigned char *out)
{
    EVP_CIPHER_CTX *ctx = v->open_ctx;
    int len = 0;
    if (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, entry) != 1) fail(EXIT_INTERNAL, "AES-256-GCM failed");
    if (out) {
        if (EVP_DecryptUpdate(ctx, out, &len, data, (int)n) != 1) return 0;
    } else if (EVP_DecryptUpdate(ctx, NULL, &len, data, (int)n) != 1) { /* authenticated: the chunk is AAD */
        return 0;
    }
    if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_SIZE, (void *)(entry + NONCE_SIZE)) != 1) return 0;
    return EVP_DecryptFinal_ex(ctx, v->scratch, &len) == 1;
}

/* 1 if DATA[0:n] is the authentic plaintext of an encrypted chunk: sealing it again gives the recorded tag. */
static int plaintext_chunk(struct volume *v, const unsigned char *entry, const unsigned char *data, size_t n)
{
    EVP_CIPHER_CTX *ctx = v->seal_ctx;
    int len = 0;
    unsigned char tag[TAG_SIZE];
    if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, entry) != 1 ||
        EVP_EncryptUpdate(ctx, v->scratch, &len, data, (int)n) != 1 ||
        EVP_EncryptFinal_ex(ctx, v->scratch, &len) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_SIZE, tag) != 1)
        fail(EXIT_INTERNAL, "AES-256-GCM failed");
    return CRYPTO_memcmp(tag, entry + NONCE_SIZE, TAG_SIZE) == 0;
}

enum state { STATE_AUTHENTICATED, STATE_CIPHERTEXT, STATE_PLAINTEXT };

static void check_file(struct volume *v, struct frame *dir, const char *name, const char *path,
                       const struct stat *st, struct record *r)
{
    const struct record *content = &v->records[r->content];
    if (!S_ISREG(st->st_mode)) {
        const char *what = S_ISDIR(st->st_mode) ? "a directory" : S_ISLNK(st->st_mode) ? "a symlink" : "a special file";
        problem(path, "type-changed", "is %s, expected a regular file", what);
    }
    if ((uint64_t)st->st_size != content->size)
        problem(path, (uint64_t)st->st_size < content->size ? "truncated" : "extended", "is %lld bytes, expected %llu",
                (long long)st->st_size, (unsigned long long)content->size);
    v->summary->files++;
    int encrypted = content->protection == MODE_ENCRYPTED;
    if (r->kind == KIND_HARDLINK && encrypted) add_pending(v, (size_t)(r - v->records), dir, name, NULL);
    if (content->size == 0) return;

    int fd = openat(dir->fd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) problem(path, "unreadable", "cannot be read (%s)", strerror(errno));
    unsigned char key[32];
    file_key(v, content, key);
    if (EVP_DecryptInit_ex(v->open_ctx, NULL, NULL, key, NULL) != 1 ||
        EVP_EncryptInit_ex(v->seal_ctx, NULL, NULL, key, NULL) != 1)
        fail(EXIT_INTERNAL, "AES-256-GCM failed");
    OPENSSL_cleanse(key, sizeof key);

    enum state state = encrypted ? STATE_CIPHERTEXT : STATE_AUTHENTICATED;
    int out_fd = -1;
    char *temp = NULL;
    uint64_t chunks = content->size / v->chunk_size + (content->size % v->chunk_size != 0);
    size_t per_batch = v->batch / v->chunk_size;
    for (uint64_t index = 0; index < chunks; index += per_batch) {
        uint64_t offset = index * v->chunk_size;
        size_t length = content->size - offset < v->batch ? (size_t)(content->size - offset) : v->batch;
        size_t got = 0;
        while (got < length) {
            ssize_t n = pread(fd, v->in + got, length - got, (off_t)(offset + got));
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) problem(path, "unreadable", "cannot be read (%s)", strerror(errno));
            if (n == 0) problem(path, "truncated", "ends after %llu bytes, expected %llu",
                                (unsigned long long)(offset + got), (unsigned long long)content->size);
            got += (size_t)n;
        }
        for (size_t pos = 0; pos < length; pos += v->chunk_size) {
            uint64_t i = index + pos / v->chunk_size;
            size_t n = length - pos < v->chunk_size ? length - pos : v->chunk_size;
            const unsigned char *entry = content->chunks + i * ENTRY_SIZE;
            int ok;
            if (state == STATE_AUTHENTICATED) {
                ok = open_chunk(v, entry, v->in + pos, n, NULL);
            } else if (state == STATE_CIPHERTEXT) {
                ok = open_chunk(v, entry, v->in + pos, n, v->out + pos);
                if (!ok && i == 0 && plaintext_chunk(v, entry, v->in, n)) {
                    /* Decrypted by an earlier start of this container: the file is its plaintext. */
                    state = STATE_PLAINTEXT;
                    ok = 1;
                }
            } else {
                ok = plaintext_chunk(v, entry, v->in + pos, n);
            }
            if (!ok) {
                close(fd);
                if (out_fd >= 0) {
                    close(out_fd);
                    unlinkat(dir->fd, temp, 0);
                }
                chunk_failed(v, path, i, content->size);
            }
        }
        if (state == STATE_CIPHERTEXT && r->kind == KIND_FILE) {
            if (out_fd < 0) {
                out_fd = make_temp(v, dir, name, &temp);
                add_pending(v, (size_t)(r - v->records), dir, name, temp);
            }
            write_all(out_fd, v->out, length, (off_t)offset, dir->path);
        }
    }
    close(fd);
    if (out_fd >= 0) {
        /* The owner first: chown clears set-user-ID bits that chmod then puts back. */
        if (v->root && fchown(out_fd, r->uid, r->gid) < 0) cannot_write(dir->path, errno);
        if (fchmod(out_fd, r->st_mode & 07777) < 0) cannot_write(dir->path, errno);
        set_xattrs(out_fd, r);
        struct timespec times[2];
        times[0].tv_sec = times[1].tv_sec = (time_t)(r->mtime_ns >= 0 ? r->mtime_ns / 1000000000
                                                                       : -((-r->mtime_ns + 999999999) / 1000000000));
        times[0].tv_nsec = times[1].tv_nsec = (long)(r->mtime_ns - (int64_t)times[0].tv_sec * 1000000000);
        if (futimens(out_fd, times) < 0) cannot_write(dir->path, errno);
        if (close(out_fd) < 0) cannot_write(dir->path, errno);
        v->summary->decrypted++;
    }
}

/* -- the walk ------------------------------------------------------------------------------------------------ */

static const char *type_word(mode_t mode)
{
    if (S_ISREG(mode)) return "a regular file";
    if (S_ISDIR(mode)) return "a directory";
    if (S_ISLNK(mode)) return "a symlink";
    if (S_ISCHR(mode)) return "a character device";
    if (S_ISBLK(mode)) return "a block device";
    if (S_ISFIFO(mode)) return "a FIFO";
    if (S_ISSOCK(mode)) return "a socket";
    return "an unknown file type";
}

/* Left by an earlier start of this container from the CAS's answer (struct fspf_expected): an injected file, a
 * volume's directory, or a directory on the way to one of them. */
static int left_by_cas(const struct volume *v, const char *path, size_t len, const struct stat *st)
{
    const struct fspf_expected *e = v->expected;
    if (!e) return 0;
    for (size_t i = 0; i < e->file_count; i++) {
        size_t flen = strlen(e->files[i]);
        if (S_ISREG(st->st_mode) && flen == len && !memcmp(e->files[i], path, len)) return 1;
        if (S_ISDIR(st->st_mode) && flen > len && is_below(e->files[i], flen, path, len)) return 1;
    }
    for (size_t i = 0; i < e->dir_count; i++) {
        if (S_ISDIR(st->st_mode) && is_below(e->dirs[i], strlen(e->dirs[i]), path, len)) return 1;
    }
    return 0;
}

/* A volume's directory that the image recorded nothing below: what it holds is the volume's. */
static int volume_contents(const struct volume *v, const char *path, size_t len)
{
    const struct fspf_expected *e = v->expected;
    if (!e) return 0;
    for (size_t i = 0; i < e->dir_count; i++) {
        if (strlen(e->dirs[i]) == len && !memcmp(e->dirs[i], path, len)) return !has_record_below(v, path, len);
    }
    return 0;
}

static void check_entry(struct volume *v, struct frame *dir, const char *name, const char *path, size_t len,
                        const struct stat *st)
{
    struct record *r = find_record(v, path, len);
    if (!r) {
        uint8_t mode = mode_for(v, path, len);
        if (mode == MODE_NOT_PROTECTED) return;
        /* The metadata file and its parent directories are not part of the volume. */
        size_t mlen = strlen(v->metadata_path);
        if (is_below(v->metadata_path, mlen, path, len)) return;
        /* A directory a layer left implicit above recorded paths: it cannot have been added. */
        if (S_ISDIR(st->st_mode) && has_record_below(v, path, len)) return;
        /* What Docker's init layer adds: an empty /.dockerenv, /etc/mtab -> /proc/mounts, and directories
         * for the paths it mounts (the not-protected regions such as /etc/hosts). */
        if (!strcmp(path, "/.dockerenv") && S_ISREG(st->st_mode) && st->st_size == 0) return;
        if (!strcmp(path, "/etc/mtab") && S_ISLNK(st->st_mode)) {
            char target[32];
            ssize_t n = readlinkat(dir->fd, name, target, sizeof target);
            if (n == 12 && !memcmp(target, "/proc/mounts", 12)) return;
        }
        if (S_ISDIR(st->st_mode) && holds_runtime_mount(v, path, len)) return;
        if (left_by_cas(v, path, len, st)) return;
        problem(path, "unexpected", "is %s in %s region that the metadata does not list: it was added, or renamed "
                "from another path", type_word(st->st_mode),
                mode == MODE_ENCRYPTED ? "an encrypted" : "an authenticated");
    }
    r->seen = 1;
    switch (r->kind) {
    case KIND_FILE:
    case KIND_HARDLINK:
        check_file(v, dir, name, path, st, r);
        break;
    case KIND_DIRECTORY:
        if (!S_ISDIR(st->st_mode)) problem(path, "type-changed", "is %s, expected a directory", type_word(st->st_mode));
        break;
    case KIND_SYMLINK: {
        if (!S_ISLNK(st->st_mode)) problem(path, "type-changed", "is %s, expected a symlink", type_word(st->st_mode));
        char *target = xmalloc(r->target_len + 2);
        ssize_t n = readlinkat(dir->fd, name, target, r->target_len + 2);
        if (n < 0) problem(path, "unreadable", "cannot be read (%s)", strerror(errno));
        if ((size_t)n != r->target_len || memcmp(target, r->target, r->target_len) != 0) {
            target[(size_t)n < r->target_len + 1 ? (size_t)n : r->target_len + 1] = '\0';
            problem(path, "link-changed", "points to %s%s, expected %s", target,
                    (size_t)n > r->target_len ? "..." : "", r->target);
        }
        free(target);
        break;
    }
    case KIND_SPECIAL:
        if ((st->st_mode & S_IFMT) != (r->st_mode & S_IFMT))
            problem(path, "type-changed", "is %s, expected %s", type_word(st->st_mode), type_word(r->st_mode));
        if (!S_ISFIFO(r->st_mode) && (major(st->st_rdev) != r->devmajor || minor(st->st_rdev) != r->devminor))
            problem(path, "link-changed", "has device %u,%u, expected %u,%u", major(st->st_rdev),
                    minor(st->st_rdev), r->devmajor, r->devminor);
        break;
    }
}

static int compare_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void walk(struct volume *v, struct frame *dir, int depth)
{
    if (depth > MAX_DEPTH)
        problem(dir->path, "unexpected", "is nested more than %d directories deep, more than sconify-run checks",
                MAX_DEPTH);
    int fd = dup(dir->fd);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    if (!d) problem(dir->path, "unreadable", "cannot be listed (%s)", strerror(errno));
    char **names = NULL;
    size_t count = 0, cap = 0;
    struct dirent *e;
    errno = 0;
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        if (count == cap) {
            cap = cap ? 2 * cap : 32;
            names = xrealloc(names, cap * sizeof *names);
        }
        names[count++] = xstrdup(e->d_name);
    }
    closedir(d);
    if (count > 1) qsort(names, count, sizeof *names, compare_names);

    size_t base = strlen(dir->path);
    for (size_t i = 0; i < count; i++) {
        size_t nlen = strlen(names[i]);
        char *path = xmalloc(base + nlen + 2);
        size_t len = 0;
        if (base > 1) {
            memcpy(path, dir->path, base);
            len = base;
        }
        path[len++] = '/';
        memcpy(path + len, names[i], nlen + 1);
        len += nlen;
        struct stat st;
        if (fstatat(dir->fd, names[i], &st, AT_SYMLINK_NOFOLLOW) < 0) {
            if (errno != ENOENT) problem(path, "unreadable", "cannot be examined (%s)", strerror(errno));
        } else {
            check_entry(v, dir, names[i], path, len, &st);
            if (S_ISDIR(st.st_mode) && protected_at_or_below(v, path, len) && !volume_contents(v, path, len)) {
                struct frame child = {-1, path, -1};
                child.fd = openat(dir->fd, names[i], O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
                if (child.fd < 0) problem(path, "unreadable", "cannot be opened (%s)", strerror(errno));
                walk(v, &child, depth + 1);
                close(child.fd);
            }
        }
        free(path);
        free(names[i]);
    }
    free(names);
}

/* -- committing ---------------------------------------------------------------------------------------------- */

/* Open the directory at volume path PATH, one component at a time and never through a symlink. */
static int open_dir(const struct volume *v, const char *path)
{
    int fd = dup(v->root_fd);
    if (fd < 0) return -1;
    char *copy = xstrdup(path), *save = NULL;
    for (char *part = strtok_r(copy, "/", &save); part; part = strtok_r(NULL, "/", &save)) {
        int next = openat(fd, part, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        close(fd);
        if (next < 0) {
            free(copy);
            return -1;
        }
        fd = next;
    }
    free(copy);
    return fd;
}

static void split_path(const char *path, char **dir, const char **name)
{
    const char *slash = strrchr(path, '/');
    *dir = slash == path ? xstrdup("/") : xstrndup(path, (size_t)(slash - path));
    *name = slash + 1;
}

/* Directory fds by path, reusing the last one: pending files come in walk order, so a directory repeats. */
struct dir_cache {
    char *path;
    int fd;
};

static int cached_dir(const struct volume *v, struct dir_cache *cache, const char *path)
{
    if (cache->path && !strcmp(cache->path, path)) return cache->fd;
    if (cache->path) {
        close(cache->fd);
        free(cache->path);
        cache->path = NULL;
    }
    int fd = open_dir(v, path);
    if (fd < 0) cannot_write(path, errno);
    cache->path = xstrdup(path);
    cache->fd = fd;
    return fd;
}

static void commit(struct volume *v)
{
    struct dir_cache cache = {NULL, -1}, target_cache = {NULL, -1};
    /* Decrypted files first, then hard links to them, then the timestamps of the directories. */
    for (size_t i = 0; i < v->pending_count; i++) {
        struct pending *p = &v->pending[i];
        if (!p->temp) continue;
        int dfd = cached_dir(v, &cache, p->dir);
        if (renameat(dfd, p->temp, dfd, p->name) < 0) cannot_write(p->dir, errno);
        free(p->temp);
        p->temp = NULL;
    }
    for (size_t i = 0; i < v->pending_count; i++) {
        struct pending *p = &v->pending[i];
        if (p->temp) continue;
        const struct record *target = &v->records[v->records[p->record].content];
        char *tdir;
        const char *tname;
        split_path(target->path, &tdir, &tname);
        int tfd = cached_dir(v, &target_cache, tdir);
        int dfd = cached_dir(v, &cache, p->dir);
        struct stat a, b;
        if (fstatat(dfd, p->name, &a, AT_SYMLINK_NOFOLLOW) < 0 || fstatat(tfd, tname, &b, AT_SYMLINK_NOFOLLOW) < 0)
            cannot_write(p->dir, errno);
        if (a.st_ino != b.st_ino || a.st_dev != b.st_dev) {
            struct frame frame = {dfd, p->dir, -1};
            for (size_t k = 0; k < v->dir_count; k++) {
                if (!strcmp(v->dirs[k].path, p->dir)) frame.touched = (long)k;
            }
            touch_dir(v, &frame);
            char buf[NAME_MAX + 1];
            snprintf(buf, sizeof buf, ".sconify-run-link-%ld-%u", (long)getpid(), v->temp_counter++);
            if (linkat(tfd, tname, dfd, buf, 0) < 0) cannot_write(p->dir, errno);
            if (renameat(dfd, buf, dfd, p->name) < 0) {
                int err = errno;
                unlinkat(dfd, buf, 0);
                cannot_write(p->dir, err);
            }
        }
        free(tdir);
    }
    for (size_t i = 0; i < v->dir_count; i++) {
        int dfd = cached_dir(v, &cache, v->dirs[i].path);
        if (futimens(dfd, v->dirs[i].times) < 0) { /* best effort: only timestamps */ }
    }
    if (cache.path) close(cache.fd);
    if (target_cache.path) close(target_cache.fd);
    free(cache.path);
    free(target_cache.path);
}

void fspf_prepare(const char *metadata_path, const unsigned char key[32], const unsigned char tag[16],
                  const struct fspf_expected *expected, struct fspf_summary *summary)
{
    struct volume v;
    memset(&v, 0, sizeof v);
    memset(summary, 0, sizeof *summary);
    v.summary = summary;
    v.expected = expected;
    v.metadata_path = metadata_path;
    v.root = geteuid() == 0;
    active = &v;

    unsigned char *body = NULL;
    size_t body_len = 0;
    open_metadata(&v, key, tag, &body, &body_len);
    parse_body(&v, body, body_len);
    summary->records = v.record_count;

    v.batch = BATCH_BYTES / v.chunk_size * v.chunk_size;
    if (v.batch < v.chunk_size) v.batch = v.chunk_size;
    v.in = xmalloc(v.batch);
    v.out = xmalloc(v.batch);
    v.scratch = xmalloc(v.chunk_size + TAG_SIZE);
    v.open_ctx = EVP_CIPHER_CTX_new();
    v.seal_ctx = EVP_CIPHER_CTX_new();
    if (!v.open_ctx || !v.seal_ctx || EVP_DecryptInit_ex(v.open_ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) != 1 ||
        EVP_EncryptInit_ex(v.seal_ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) != 1 ||
        EVP_CIPHER_CTX_ctrl(v.open_ctx, EVP_CTRL_GCM_SET_IVLEN, NONCE_SIZE, NULL) != 1 ||
        EVP_CIPHER_CTX_ctrl(v.seal_ctx, EVP_CTRL_GCM_SET_IVLEN, NONCE_SIZE, NULL) != 1)
        fail(EXIT_INTERNAL, "AES-256-GCM is unavailable");

    v.root_fd = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (v.root_fd < 0) fail(EXIT_INTERNAL, "cannot open the root directory: %s", strerror(errno));
    struct frame root = {v.root_fd, "/", -1};
    walk(&v, &root, 0);
    for (size_t i = 0; i < v.record_count; i++) {
        if (!v.records[i].seen)
            problem(v.records[i].path, "missing", "is missing: it was removed or renamed (or a parent directory was)");
    }
    commit(&v);
    active = NULL;

    EVP_CIPHER_CTX_free(v.open_ctx);
    EVP_CIPHER_CTX_free(v.seal_ctx);
    close(v.root_fd);
    OPENSSL_cleanse(v.prk, sizeof v.prk);
    free(v.in);
    free(v.out);
    free(v.scratch);
}
