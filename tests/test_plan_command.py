"""--command replaces the image's command for the analysis too: the program it runs is the one measured."""

import json
import subprocess
import sys

from fixtures.builder import build_image


def dry_run(ref: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sconify", "convert", ref, "--dry-run", "--json", *extra],
                          capture_output=True, text=True, timeout=120)


def test_command_option_is_analyzed_and_measured(tmp_path):
    build_image("no-command", tmp_path / "img", "latest")
    refused = dry_run(f"oci:{tmp_path}/img:latest")
    assert refused.returncode == 11 and "--command" in refused.stderr
    proc = dry_run(f"oci:{tmp_path}/img:latest", "--command", "/bin/echo hello world")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["command"] == ["/bin/echo", "hello", "world"]
    assert plan["executable"] == "/bin/busybox"
    assert plan["image_env"]["SCONIFY_EXECUTABLE"] == "/bin/busybox"


def test_command_naming_a_missing_program_is_refused(tmp_path):
    build_image("no-command", tmp_path / "img", "latest")
    proc = dry_run(f"oci:{tmp_path}/img:latest", "--command", "/nope/prog")
    assert proc.returncode == 11
    assert "/nope/prog" in proc.stderr and "Traceback" not in proc.stderr
