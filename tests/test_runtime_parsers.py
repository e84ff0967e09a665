"""The launcher's parsers agree with Python's on many random inputs: command splitting and enclave settings.

A small harness is compiled from the launcher's own sources (runtime/src/command.c, settings.c) with
AddressSanitizer and UBSan when the compiler has them; it reads many inputs at once, so thousands of
cases take well under a second. The references are ``shlex.split`` and ``EnclaveSettings.from_options``.
"""

from __future__ import annotations

import random
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from test_runtime_support import ROOT

from sconify.enclave.settings import EnclaveSettings
from sconify.errors import UsageError

SRC = ROOT / "runtime" / "src"

HARNESS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "command.h"
#include "measure.h"
#include "util.h"

/* stdin: NUL-terminated inputs. argv[1] "split": print the words, each followed by \1, then \2 (or E\2).
 * "heap" / "threads": set SCONE_HEAP / SCONE_THREADS and print the parsed value then \2 (or E\2). */
int main(int argc, char **argv)
{
    unsigned char *data;
    size_t len, start = 0;
    if (argc != 2 || read_fd(0, 1 << 26, &data, &len)) return 1;
    for (size_t i = 0; i < len; i++) {
        if (data[i]) continue;
        const char *input = (const char *)data + start;
        char err[512];
        if (!strcmp(argv[1], "split")) {
            size_t n;
            char **words = split_command(input, &n, err, sizeof err);
            if (!words) fputs("E", stdout);
            else for (size_t k = 0; k < n; k++) printf("%s\1", words[k]);
        } else {
            struct enclave_settings s;
            setenv(!strcmp(argv[1], "heap") ? "SCONE_HEAP" : "SCONE_THREADS", input, 1);
            if (settings_from_env(&s, err, sizeof err) < 0) fputs("E", stdout);
            else printf("%llu", !strcmp(argv[1], "heap") ? (unsigned long long)s.heap : (unsigned long long)s.threads);
        }
        fputc(2, stdout);
        start = i + 1;
    }
    fflush(stdout);
    return 0;
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is missing; install the Debian package gcc")
    base = tmp_path_factory.mktemp("parsers")
    (base / "harness.c").write_text(HARNESS)
    sources = [str(SRC / name) for name in ("command.c", "settings.c", "util.c", "fail.c")]
    command = ["gcc", "-std=gnu11", "-O1", "-D_GNU_SOURCE", f"-I{SRC}", str(base / "harness.c"), *sources,
               "-o", str(base / "harness")]
    sanitized = subprocess.run([*command, "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
                               capture_output=True, text=True)
    if sanitized.returncode != 0:
        subprocess.run(command, check=True, capture_output=True, text=True)
    return base / "harness"


def run_harness(harness: Path, mode: str, inputs: list[str]) -> list[str]:
    done = subprocess.run([str(harness), mode], input=b"".join(s.encode() + b"\0" for s in inputs),
                          capture_output=True, env={"ASAN_OPTIONS": "detect_leaks=0"}, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[:2000]
    results = done.stdout.decode().split("\2")[:-1]
    assert len(results) == len(inputs)
    return results


def test_command_splitting_agrees_with_shlex(harness: Path) -> None:
    rng = random.Random(20240501)
    pieces = ["a", "bc", " ", "  ", "\t", "\n", "\r", "\v", "'", '"', "\\", "\\\\", "''", '""', "$x", "#", "@@1",
              "é", "字", "=", "*"]
    inputs = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 16))) for _ in range(20000)]
    results = run_harness(harness, "split", inputs)
    split = errors = 0
    for text, result in zip(inputs, results, strict=True):
        try:
            expected: list[str] | None = shlex.split(text)
            split += 1
        except ValueError:
            expected = None
            errors += 1
        got = None if result == "E" else result.split("\1")[:-1]
        assert got == expected, text
    assert split > 5000 and errors > 5000  # both outcomes are exercised


def python_heap(text: str) -> int | None:
    try:
        return EnclaveSettings.from_options(heap=text).heap
    except UsageError:
        return None


def test_size_notation_agrees_with_sconify(harness: Path) -> None:
    rng = random.Random(7)
    pieces = ["0", "1", "4", "9", "64", "4096", "K", "k", "M", "m", "G", "g", "T", "t", "B", "b", "i", "iB", " ",
              "\t", "x", "-", "."]
    inputs = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 6))) for _ in range(5000)]
    inputs += ["64M", "1T", "1025G", "4095", "4097", "0", "0k", " 12 m i b ", "99999999999999999999999999"]
    results = run_harness(harness, "heap", inputs)
    accepted = 0
    for text, result in zip(inputs, results, strict=True):
        expected = python_heap(text)
        assert (None if result == "E" else int(result)) == expected, text
        accepted += expected is not None
    assert accepted > 300


def test_thread_counts_agree_with_sconify(harness: Path) -> None:
    inputs = ["1", "8", "4096", "4097", "0", "-1", " 12 ", "1e3", "0x10", "007", "abc", "18446744073709551617"]
    results = run_harness(harness, "threads", inputs)
    for text, result in zip(inputs, results, strict=True):
        try:
            expected: int | None = EnclaveSettings.from_options(threads=int(text)).threads
        except (ValueError, UsageError):
            expected = None
        assert (None if result == "E" else int(result)) == expected, text
