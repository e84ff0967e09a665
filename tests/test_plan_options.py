"""One mapping from `sconify convert`'s flag names to ConvertOptions, shared by the CLI, job files and routes."""

import pytest

from sconify.errors import UsageError
from sconify.plan import DEFAULT_CAS, ConvertOptions, options_from_flags


def test_flags_in_every_shape_give_the_same_options():
    as_cli = options_from_flags({"encrypt": ("/app",), "env": ("A=1", "B=x=y"), "command": ("/bin/app -v 'a b'",),
                                 "heap": "1G", "threads": 8, "session": "s"})
    as_job = options_from_flags({"encrypt": ["/app"], "env": ["A=1", "B=x=y"], "command": ["/bin/app", "-v", "a b"],
                                 "heap": "1G", "threads": "8", "session": "s", "name": "job-name"})
    as_route = options_from_flags({"encrypt": "/app", "env": {"A": "1", "B": "x=y"}, "command": "/bin/app -v 'a b'",
                                   "heap": "1G", "threads": 8, "session": "s"})
    assert as_cli == as_job == as_route
    assert as_cli.command == ("/bin/app", "-v", "a b")
    assert as_cli.env == (("A", "1"), ("B", "x=y"))
    assert as_cli.session == "s" and as_cli.cas == DEFAULT_CAS


def test_no_flags_are_the_defaults():
    assert options_from_flags({}) == ConvertOptions()


def test_a_malformed_env_flag_is_refused():
    with pytest.raises(UsageError, match="NAME=VALUE"):
        options_from_flags({"env": ["NOEQUALS"]})


def test_layer_compression_reaches_the_options_from_every_front_and_a_wrong_one_is_refused(tmp_path):
    from sconify.batch.jobs import parse_jobs
    from sconify.service.worker import convert_options

    assert ConvertOptions().layer_compression == "auto"
    assert options_from_flags({"layer_compression": "gzip"}).layer_compression == "gzip"
    assert convert_options({"layer_compression": "none"}).layer_compression == "none"
    jobs = parse_jobs({"jobs": [{"name": "a", "source": "oci:/x:1", "destination": "oci:/y:1",
                                 "layer-compression": "gzip"}]}, tmp_path / "jobs.yaml")
    assert jobs.specs[0].convert_options().layer_compression == "gzip"
    with pytest.raises(UsageError, match="layer compression 'zip' is not one of auto, gzip, none"):
        options_from_flags({"layer_compression": "zip"})
