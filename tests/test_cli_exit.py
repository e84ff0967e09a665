"""The console script ends quickly (no interpreter teardown) without losing output, exit codes or exit handlers."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, tmp_path: Path, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:  # noqa: ANN001
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, stdout=stdout,
                          stderr=subprocess.PIPE, timeout=120, check=False)


def test_results_written_to_a_file_are_complete_and_exit_handlers_run(tmp_path: Path) -> None:
    # stdout to a file is block-buffered: whatever sits in the buffer must be flushed before the quick exit.
    marker = tmp_path / "handler-ran"
    with open(tmp_path / "out.json", "wb") as out:
        proc = _run(f"""
            import atexit, sys
            from sconify.cli import run
            atexit.register(lambda: open({str(marker)!r}, "w").write("yes"))
            sys.argv = ["sconify", "rules", "list", "--json"]
            run()
        """, tmp_path, stdout=out)
    assert proc.returncode == 0, proc.stderr
    reference = subprocess.run([sys.executable, "-c", "import json, sys; from sconify.cli import main; "
                                "sys.argv = ['sconify', 'rules', 'list', '--json']; main()"],
                               capture_output=True, timeout=120, check=False)
    assert reference.returncode == 0
    assert (tmp_path / "out.json").read_bytes() == reference.stdout and len(reference.stdout) > 1000
    assert marker.read_text() == "yes"


def test_exit_codes_survive_the_quick_exit(tmp_path: Path) -> None:
    usage = subprocess.run([sys.executable, "-m", "sconify", "convert"], capture_output=True, timeout=120,
                           check=False)
    assert usage.returncode == 2 and b"Missing argument" in usage.stderr
    missing = subprocess.run([sys.executable, "-m", "sconify", "inspect", f"oci:{tmp_path / 'none'}:v1"],
                             capture_output=True, timeout=120, check=False)
    assert missing.returncode not in (0, 1, 2) and missing.stderr.startswith(b"sconify: error:")
    version = subprocess.run([sys.executable, "-m", "sconify", "--version"], capture_output=True, timeout=120,
                             check=False)
    assert version.returncode == 0 and version.stdout.startswith(b"sconify, version ")


def test_output_that_cannot_be_written_is_an_error(tmp_path: Path) -> None:
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([sys.executable, "-m", "sconify", "rules", "list", "--json"], stdout=full,
                              stderr=subprocess.PIPE, timeout=120, check=False)
    assert proc.returncode == 74, proc.stderr
    assert b"No space left on device" in proc.stderr and b"Traceback" not in proc.stderr


def test_a_thread_still_running_gets_the_ordinary_exit(tmp_path: Path) -> None:
    # Non-daemon threads are waited for, as Python does: the quick exit is only taken when the main thread is alone.
    proc = _run("""
        import sys, threading, time
        from sconify.cli import run
        threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished", flush=True))).start()
        sys.argv = ["sconify", "--version"]
        run()
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [proc.stdout.splitlines()[0], b"thread finished"]


def test_a_profiler_still_gets_to_write_its_report(tmp_path: Path) -> None:
    out = tmp_path / "prof.out"
    proc = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(out), "-m", "sconify", "--version"],
                          capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0
