/* Verifying the image's file-system protection (FSPF, docs/fspf.md) and making its files readable. */
#ifndef SCONIFY_RUN_FSPF_H
#define SCONIFY_RUN_FSPF_H

#include <stddef.h>

struct fspf_summary {
    size_t records;   /* protected paths in the metadata */
    size_t files;     /* regular files and hard links checked */
    size_t decrypted; /* files written as plaintext in this start */
};

/*
 * What the CAS's answer writes after the check (injected files, volumes' directories). A container started
 * again with its old file system finds them, left by its first start: an injected file that is a regular file
 * (it is replaced by a new one before the launch), a volume's directory and the directories on the way to
 * either are then not "unexpected", and what a volume's directory holds is the volume's, not the image's
 * (unless the image itself recorded files there). NULL: nothing is expected.
 */
struct fspf_expected {
    char *const *files;
    size_t file_count;
    char *const *dirs;
    size_t dir_count;
};

/*
 * Verify the volume rooted at "/" whose metadata file is at METADATA_PATH with the 32-byte KEY and the
 * 16-byte expected TAG: every protected path, every chunk, nothing added. Encrypted files still stored as
 * ciphertext are decrypted in place (temporary file, original owner, mode, mtime and xattrs, rename) once
 * everything verified. Ends the process with EXIT_PROTECTION naming the first problem, or EXIT_READ_ONLY
 * when the plaintext cannot be written; leaves no plaintext behind when it refuses.
 */
void fspf_prepare(const char *metadata_path, const unsigned char key[32], const unsigned char tag[16],
                  const struct fspf_expected *expected, struct fspf_summary *summary);

#endif
