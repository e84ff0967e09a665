/* Refusals and exit codes of sconify-run: each failure is one line on stderr and a distinct code. */
#ifndef SCONIFY_RUN_FAIL_H
#define SCONIFY_RUN_FAIL_H

/*
 * The codes live in a block (220-229) that applications rarely use: above the sysexits range (64-78)
 * and above 128 + signal number (up to 192 with real-time signals). An exec failure uses the codes
 * shells and `docker run` use for the same thing: 126 (cannot execute) and 127 (not found).
 * docs/runtime.md lists them; keep the two in step.
 */
enum exit_code {
    EXIT_USAGE = 2,              /* a malformed option of sconify-run itself (--measure ARGS) */
    EXIT_CANNOT_EXECUTE = 126,   /* the command exists but cannot be executed */
    EXIT_COMMAND_NOT_FOUND = 127,/* the command does not exist */
    EXIT_INTERNAL = 220,         /* out of memory, an unexpected system call failure: a bug or a broken host */
    EXIT_NO_SESSION = 221,       /* SCONIFY_SESSION_FILE unset, or the file is missing or unreadable */
    EXIT_BAD_SESSION = 222,      /* the session file is not valid YAML or a field is malformed */
    EXIT_NO_SERVICE = 223,       /* the session is another session or has no service of this name */
    EXIT_BAD_CONFIG = 224,       /* SCONE_CONFIG_ID, SCONE_MODE, an enclave setting or SCONIFY_USER is malformed */
    EXIT_MEASUREMENT = 225,      /* MRENCLAVE is not in the session, or the enclave cannot be measured */
    EXIT_PROTECTION = 226,       /* the file-system protection does not verify (key, tag, a file) */
    EXIT_HOST_ARGS = 227,        /* arguments from the host that the session does not allow */
    EXIT_READ_ONLY = 228,        /* protected files cannot be made readable: read-only root, no permission */
    EXIT_START = 229,            /* the working directory or the user switch failed */
};

/* Print "sconify-run: MESSAGE" as one line on stderr (control characters escaped) and exit with CODE. */
_Noreturn void fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Format into a caller's buffer, truncating; for messages assembled in steps. */
void message(char *buf, unsigned long size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
