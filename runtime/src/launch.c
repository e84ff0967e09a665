/* The last step: the process becomes the application (signals and the exit status pass through). */
#include "launch.h"

#include <errno.h>
#include <grp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fail.h"
#include "util.h"

/* Docker's default PATH, for a session environment without one. */
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

static int parse_id(const char *s, size_t n, uint32_t *out)
{
    if (n == 0 || n > 10) return -1;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    if (v >= UINT32_MAX) return -1; /* (uid_t)-1 means "unchanged" to setresuid */
    *out = (uint32_t)v;
    return 0;
}

int parse_user(const char *text, struct user *user)
{
    memset(user, 0, sizeof *user);
    if (!text || !*text) return 0;
    const char *colon = strchr(text, ':');
    uint32_t uid, gid;
    if (!colon || parse_id(text, (size_t)(colon - text), &uid) < 0 || parse_id(colon + 1, strlen(colon + 1), &gid) < 0)
        return -1;
    user->given = 1;
    user->uid = uid;
    user->gid = gid;
    return 0;
}

static const char *lookup_env(char **envp, const char *name)
{
    size_t n = strlen(name);
    for (char **e = envp; *e; e++) {
        if (!strncmp(*e, name, n) && (*e)[n] == '=') return *e + n + 1;
    }
    return NULL;
}

static _Noreturn void exec_failed(const char *program, int err)
{
    if (err == ENOENT || err == ENOTDIR)
        fail(EXIT_COMMAND_NOT_FOUND, "cannot start the command: %s does not exist in the image; check the command "
             "in the session", program);
    if (err == ENOEXEC)
        fail(EXIT_CANNOT_EXECUTE, "cannot start the command: %s is neither a program nor a script with a #! line",
             program);
    fail(EXIT_CANNOT_EXECUTE, "cannot start the command %s: %s", program, strerror(err));
}

void launch(char **argv, const struct service_config *service, const struct user *user)
{
    char **envp = xcalloc(service->env_count + 1, sizeof *envp);
    for (size_t i = 0; i < service->env_count; i++) {
        size_t a = strlen(service->env_names[i]), b = strlen(service->env_values[i]);
        envp[i] = xmalloc(a + b + 2);
        memcpy(envp[i], service->env_names[i], a);
        envp[i][a] = '=';
        memcpy(envp[i] + a + 1, service->env_values[i], b + 1);
    }

    /* As root, before the switch: a working directory the user cannot search still works, as with Docker. */
    if (chdir(service->pwd) < 0)
        fail(EXIT_START, "cannot change to the working directory %s (pwd of the session): %s", service->pwd,
             strerror(errno));
    if (user->given && geteuid() == 0) {
        if (setgroups(1, &user->gid) < 0 || setresgid(user->gid, user->gid, user->gid) < 0 ||
            setresuid(user->uid, user->uid, user->uid) < 0)
            fail(EXIT_START, "cannot switch to the image's user %u:%u (SCONIFY_USER): %s", (unsigned)user->uid,
                 (unsigned)user->gid, strerror(errno));
    }

    const char *program = argv[0];
    if (strchr(program, '/')) {
        execve(program, argv, envp);
        exec_failed(program, errno);
    }
    const char *path = lookup_env(envp, "PATH");
    if (!path) path = DEFAULT_PATH;
    int denied = 0;
    size_t plen = strlen(program);
    for (const char *p = path;;) {
        const char *end = strchr(p, ':');
        size_t dlen = end ? (size_t)(end - p) : strlen(p);
        char *candidate = xmalloc(dlen + plen + 3);
        if (dlen == 0) {
            memcpy(candidate, "./", 2); /* an empty PATH entry is the working directory, as in POSIX shells */
            memcpy(candidate + 2, program, plen + 1);
        } else {
            memcpy(candidate, p, dlen);
            candidate[dlen] = '/';
            memcpy(candidate + dlen + 1, program, plen + 1);
        }
        execve(candidate, argv, envp);
        int err = errno;
        if (err == EACCES) denied = 1;
        else if (err != ENOENT && err != ENOTDIR && err != ENAMETOOLONG && err != ELOOP) exec_failed(candidate, err);
        free(candidate);
        if (!end) break;
        p = end + 1;
    }
    if (denied)
        fail(EXIT_CANNOT_EXECUTE, "cannot start the command %s: permission denied for the image's user", program);
    fail(EXIT_COMMAND_NOT_FOUND, "cannot start the command: %s is not in the session's PATH (%s); check the "
         "command and environment in the session", program, path);
}
