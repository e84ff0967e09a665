/* The configuration from sconify's development CAS (`sconify cas serve`) instead of a session file. */
#ifndef SCONIFY_RUN_CAS_H
#define SCONIFY_RUN_CAS_H

#include "launch.h"
#include "session.h"

/* Whether SCONE_CAS_ADDR names a development CAS: "unix:/PATH" or "https://IP:PORT". */
int cas_is_dev(const char *address);

/*
 * Present CONFIG_ID and MRENCLAVE (64 lowercase hex digits) to the CAS at ADDRESS and fill OUT and EXTRA from
 * its answer, or end the process: EXIT_NO_SESSION (unreachable), EXIT_MEASUREMENT (refused: the measurement is
 * not in the session), EXIT_NO_SERVICE (no such session or service), EXIT_BAD_SESSION (a malformed answer).
 */
void cas_fetch(const char *address, const char *config_id, const char *mrenclave, struct service_config *out,
               struct cas_extras *extra);

/* Write the injected files (mode 0600, owned by USER) and create the volumes' directories, before the launch. */
void cas_write_files(const struct cas_extras *extra, const struct user *user);

#endif
