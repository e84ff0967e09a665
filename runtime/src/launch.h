/* Starting the session's command: environment, working directory, user, exec. */
#ifndef SCONIFY_RUN_LAUNCH_H
#define SCONIFY_RUN_LAUNCH_H

#include <sys/types.h>

#include "session.h"

struct user {
    int given; /* 0: keep the current credentials */
    uid_t uid;
    gid_t gid;
};

/* Parse SCONIFY_USER ("uid:gid", numbers only: no user database lookups); -1 if malformed. */
int parse_user(const char *text, struct user *user);

/*
 * Replace this process by ARGV with exactly the service's environment, in its working directory, as USER.
 * Never returns: on failure ends with EXIT_START, EXIT_CANNOT_EXECUTE or EXIT_COMMAND_NOT_FOUND.
 */
_Noreturn void launch(char **argv, const struct service_config *service, const struct user *user);

#endif
