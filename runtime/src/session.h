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

/*
 * Load the service SERVICE of session SESSION from the YAML file at PATH, or end the process with a
 * refusal: EXIT_NO_SESSION (missing or unreadable file), EXIT_BAD_SESSION (not YAML, a malformed
 * field), EXIT_NO_SERVICE (another session, or no such service).
 */
void session_load(const char *path, const char *session, const char *service, struct service_config *out);

#endif
