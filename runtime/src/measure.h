/* Enclave settings from the environment and MRENCLAVE exactly as docs/enclave.md specifies it. */
#ifndef SCONIFY_RUN_MEASURE_H
#define SCONIFY_RUN_MEASURE_H

#include <stddef.h>
#include <stdint.h>

#define MRENCLAVE_SIZE 32

struct enclave_settings {
    uint64_t heap;    /* bytes, a multiple of 4096 */
    uint64_t stack;   /* bytes per thread, a multiple of 4096 */
    uint32_t threads; /* 1..4096 */
    uint32_t dlopen;  /* 0 off, 1 protected, 2 unprotected */
    int debug;        /* 0 or 1 */
};

/*
 * Read SCONE_HEAP, SCONE_STACK, SCONE_THREADS, SCONE_ALLOW_DLOPEN and SCONE_DEBUG with the defaults and
 * rules of sconify/enclave/settings.py (an unset or empty variable takes the default). Returns 0, or -1
 * with a sentence in ERR.
 */
int settings_from_env(struct enclave_settings *settings, char *err, size_t errlen);

/*
 * MRENCLAVE of the enclave for the runtime ELF, the executable ELF (NULL: none) and the settings, as
 * sconify.enclave.measure() computes it. Returns 0, or -1 with a sentence in ERR (an ELF that cannot be
 * measured, an enclave too large).
 */
int measure_enclave(const unsigned char *runtime, size_t runtime_length, const char *runtime_name,
                    const unsigned char *executable, size_t executable_length, const char *executable_name,
                    const struct enclave_settings *settings, unsigned char mrenclave[MRENCLAVE_SIZE],
                    char *err, size_t errlen);

#endif
