/*
 * sconify-run: the open runtime of a converted image, in simulation mode (no SGX, no SCONE runtime).
 *
 *   1. read the service's configuration from the session file (SCONIFY_SESSION_FILE, SCONE_CONFIG_ID);
 *   2. measure the enclave (this binary, SCONIFY_EXECUTABLE, the SCONE_* settings) and refuse to start
 *      unless MRENCLAVE is one of the session's mrenclaves;
 *   3. verify the file-system protection with the session's fspf_key and fspf_tag;
 *   4. make the protected files readable with their original owner, mode and mtime;
 *   5. become the session's command, with its environment and working directory, as the image's user.
 *
 * `sconify-run --measure` prints the MRENCLAVE for the current environment and exits (no session needed).
 * docs/runtime.md describes the contract with `sconify convert`.
 */
#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "cas.h"
#include "command.h"
#include "fail.h"
#include "fspf.h"
#include "launch.h"
#include "measure.h"
#include "session.h"
#include "util.h"

#define BINARY_MAX (1ull << 31)

/* Kept in the loaded read-only data (even by --gc-sections): it names the build, and tests rewrite it to
 * make runtimes with other bytes. */
__attribute__((used, retain)) const char sconify_run_ident[] = "sconify-run open runtime 1 (simulation mode)";

static unsigned char *read_file(const char *path, size_t *length, int code, const char *what)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(code, "measurement failed: cannot open %s %s (%s)", what, path, strerror(errno));
    unsigned char *data = NULL;
    int rc = read_fd(fd, BINARY_MAX, &data, length);
    close(fd);
    if (rc) fail(code, "measurement failed: cannot read %s %s (%s)", what, path, strerror(rc));
    return data;
}

/* MRENCLAVE of this runtime, SCONIFY_EXECUTABLE and the enclave settings in the environment. */
static void measure_self(unsigned char mrenclave[MRENCLAVE_SIZE])
{
    struct enclave_settings settings;
    char err[1024];
    if (settings_from_env(&settings, err, sizeof err) < 0) fail(EXIT_BAD_CONFIG, "%s", err);

    const char *exe_path = getenv("SCONIFY_EXECUTABLE");
    if (exe_path && !*exe_path) exe_path = NULL;
    if (exe_path && exe_path[0] != '/')
        fail(EXIT_BAD_CONFIG, "SCONIFY_EXECUTABLE '%s' is not an absolute path; convert the image again", exe_path);

    size_t runtime_length = 0, exe_length = 0;
    unsigned char *runtime = read_file("/proc/self/exe", &runtime_length, EXIT_MEASUREMENT,
                                       "the runtime's own binary (mount /proc)");
    unsigned char *exe = exe_path ? read_file(exe_path, &exe_length, EXIT_MEASUREMENT, "the executable") : NULL;
    if (measure_enclave(runtime, runtime_length, "the runtime /proc/self/exe", exe, exe_length, exe_path, &settings,
                        mrenclave, err, sizeof err) < 0)
        fail(EXIT_MEASUREMENT, "measurement failed: %s", err);
    free(runtime);
    free(exe);
}

static void check_mode(void)
{
    const char *mode = getenv("SCONE_MODE");
    if (!mode || !*mode || !strcasecmp(mode, "sim") || !strcasecmp(mode, "auto")) return;
    if (!strcasecmp(mode, "hw"))
        fail(EXIT_BAD_CONFIG, "SCONE_MODE=hw needs SGX and SCONE's runtime; this open runtime runs in simulation mode "
             "only, so set SCONE_MODE=sim or convert the image with --runtime and a SCONE runtime image");
    fail(EXIT_BAD_CONFIG, "SCONE_MODE '%s' is not known; use sim", mode);
}

int main(int argc, char **argv)
{
    /* Never read an OpenSSL configuration: the environment is the untrusted host's. */
    OPENSSL_init_crypto(OPENSSL_INIT_NO_LOAD_CONFIG | OPENSSL_INIT_NO_ATEXIT, NULL);

    unsigned char mrenclave[MRENCLAVE_SIZE];
    char hex[2 * MRENCLAVE_SIZE + 1];
    if (argc >= 2 && !strcmp(argv[1], "--measure")) {
        if (argc > 2) fail(EXIT_USAGE, "--measure takes no arguments; set SCONIFY_EXECUTABLE and SCONE_HEAP etc.");
        measure_self(mrenclave);
        hex_encode(mrenclave, MRENCLAVE_SIZE, hex);
        printf("%s\n", hex);
        return fflush(stdout) == 0 ? 0 : EXIT_INTERNAL;
    }

    check_mode();
    const char *config_id = getenv("SCONE_CONFIG_ID");
    const char *slash = config_id ? strrchr(config_id, '/') : NULL;
    if (!config_id || !slash || slash == config_id || !slash[1])
        fail(EXIT_BAD_CONFIG, "SCONE_CONFIG_ID '%s' is not SESSION/SERVICE; convert the image again or set it to the "
             "session and service names", config_id ? config_id : "");
    char *session_name = xstrndup(config_id, (size_t)(slash - config_id));
    const char *service_name = slash + 1;
    struct user user;
    const char *user_text = getenv("SCONIFY_USER");
    if (parse_user(user_text, &user) < 0)
        fail(EXIT_BAD_CONFIG, "SCONIFY_USER '%s' is not UID:GID in numbers; convert the image again", user_text);

    struct service_config service;
    struct cas_extras extra;
    memset(&extra, 0, sizeof extra);
    const char *cas_address = getenv("SCONE_CAS_ADDR");
    if (cas_is_dev(cas_address)) {
        /* The development CAS decides: it gets the measurement and answers only for an allowed one. */
        measure_self(mrenclave);
        hex_encode(mrenclave, MRENCLAVE_SIZE, hex);
        cas_fetch(cas_address, config_id, hex, &service, &extra);
    } else {
        const char *session_file = getenv("SCONIFY_SESSION_FILE");
        if (!session_file || !*session_file)
            fail(EXIT_NO_SESSION, "no session: SCONIFY_SESSION_FILE is not set; mount the session file and name it, "
                 "e.g. docker run -v $PWD/session.yml:/run/sconify/session.yml:ro "
                 "-e SCONIFY_SESSION_FILE=/run/sconify/session.yml IMAGE (or set SCONE_CAS_ADDR to a development CAS)");
        session_load(session_file, session_name, service_name, &service);
        measure_self(mrenclave);
        hex_encode(mrenclave, MRENCLAVE_SIZE, hex);
    }
    int allowed = 0;
    for (size_t i = 0; i < service.mrenclave_count; i++) {
        if (!strcmp(service.mrenclaves[i], hex)) allowed = 1;
    }
    if (!allowed) {
        char listed[1024] = "";
        size_t used = 0;
        for (size_t i = 0; i < service.mrenclave_count && used + 70 < sizeof listed; i++)
            used += (size_t)snprintf(listed + used, sizeof listed - used, "%s%s", i ? ", " : "", service.mrenclaves[i]);
        fail(EXIT_MEASUREMENT, "measurement mismatch: this enclave measures %s, but the session allows only %s; the "
             "runtime, the executable or an enclave setting (SCONE_HEAP, SCONE_STACK, SCONE_THREADS, "
             "SCONE_ALLOW_DLOPEN, SCONE_DEBUG) differs from the converted image", hex, listed);
    }

    char err[1024];
    size_t count = 0;
    char **words = split_command(service.command, &count, err, sizeof err);
    if (!words) fail(EXIT_BAD_SESSION, "the command of service '%s' cannot be split into arguments: %s", service_name,
                     err);
    if (count == 0) fail(EXIT_BAD_SESSION, "the command of service '%s' is empty; convert the image again",
                         service_name);
    char **command = apply_host_arguments(words, count, argv + 1, (size_t)(argc > 1 ? argc - 1 : 0), err, sizeof err);
    if (!command) fail(EXIT_HOST_ARGS, "%s", err);
    if (!command[0])
        fail(EXIT_HOST_ARGS, "the command of service '%s' is only host arguments, and none were given; give the "
             "program after the image name", service_name);

    if (service.fspf_path) {
        unsigned char key[32], tag[16];
        if (hex_decode(service.fspf_key, key, sizeof key) || hex_decode(service.fspf_tag, tag, sizeof tag))
            fail(EXIT_INTERNAL, "the session's fspf_key or fspf_tag is not hex");
        struct fspf_summary summary;
        /* What the CAS's answer writes below: a restarted container finds it, left by its first start. */
        char **injected = xmalloc((extra.file_count + 1) * sizeof *injected);
        for (size_t i = 0; i < extra.file_count; i++) injected[i] = extra.files[i].path;
        struct fspf_expected expected = {injected, extra.file_count, extra.volume_paths, extra.volume_count};
        fspf_prepare(service.fspf_path, key, tag, &expected, &summary);
        free(injected);
        OPENSSL_cleanse(key, sizeof key);
    }
    cas_write_files(&extra, &user);
    launch(command, &service, &user);
}
