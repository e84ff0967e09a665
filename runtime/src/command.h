/* The session's command line as argv: POSIX-shell-like splitting and SCONE's @@N host arguments. */
#ifndef SCONIFY_RUN_COMMAND_H
#define SCONIFY_RUN_COMMAND_H

#include <stddef.h>

/*
 * Split COMMAND as Python's shlex.split(COMMAND) does (POSIX mode, no comments): whitespace separates
 * words; single quotes keep everything; double quotes keep everything but let a backslash escape '"' and
 * '\'; outside quotes a backslash escapes any character. Returns a NULL-terminated argv and its length in
 * COUNT, or NULL with a sentence in ERR (an unclosed quote, a trailing backslash).
 */
char **split_command(const char *command, size_t *count, char *err, size_t errlen);

/*
 * Put the host arguments into ARGV where the session allows them. A word that is exactly @@N becomes
 * host argument N (or disappears when fewer were given); @@N inside a longer word is replaced by its text
 * (or nothing). Returns the new argv, or NULL with a sentence in ERR when the host gave arguments the
 * command has no placeholder for.
 */
char **apply_host_arguments(char **argv, size_t count, char **host, size_t host_count, char *err, size_t errlen);

#endif
