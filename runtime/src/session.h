/* The service's configuration from a CAS session file (session language v0.3, YAML). */
#ifndef SCONIFY_RUN_SESSION_H
#define SCONIFY_RUN_SESSION_H

#include <stddef.h>

struct service_config {
    char **mrenclaves;    /* lowercase hex, 64 digits each */
    size_t mrenclave_count;
    char *command;        /* the command line, split later with shlex rules */
    char **env_names;     /* the service's environment, in the order of the file */
    char **env_values;
    size_t env_count;
    char *pwd;            /* "/" when the session gives none */
    char *fspf_path;      /* NULL when the service has no file-system protection */
    char *fspf_key;       /* 64 hex digits */
    char *fspf_tag;       /* 32 hex digits */
};

/* What only the development CAS hands out: files to inject and the encrypted volumes' mount points. */
struct injected_file {
    char *path;
    unsigned char *content;
    size_t length;
};

struct cas_extras {
    struct injected_file *files;
    size_t file_count;
    char **volume_paths;
    size_t volume_count;
};

/*
 * Read a configuration answer of the development CAS at ORIGIN (the fields of one service, plus
 * injection_files and volumes) into OUT and EXTRA, or end the process with EXIT_BAD_SESSION.
 */
void session_from_cas(const unsigned char *data, size_t length, const char *origin, struct service_config *out,
                      struct cas_extras *extra);

/*
 * Load the service SERVICE of session SESSION from the YAML file at PATH, or end the process with a
 * refusal: EXIT_NO_SESSION (missing or unreadable file), EXIT_BAD_SESSION (not YAML, a malformed
 * field), EXIT_NO_SERVICE (another session, or no such service).
 */
void session_load(const char *path, const char *session, const char *service, struct service_config *out);

#endif
