"""One mapping from `sconify convert`'s flag names to ConvertOptions, shared by the CLI, job files and routes."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sconify.errors import UsageError
from sconify.plan import DEFAULT_CAS, MODES, ConvertOptions, Region, _ModeLookup, options_from_flags, region_for


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


_PARTS = st.sampled_from(["a", "b", "app", "lib", "a.b"])
_PATHS = st.lists(_PARTS, min_size=1, max_size=6).map(lambda parts: "/" + "/".join(parts))


@given(
    regions=st.dictionaries(_PATHS, st.sampled_from(MODES), max_size=6),
    root=st.sampled_from(MODES),
    paths=st.lists(_PATHS, min_size=1, max_size=40),
)
@settings(max_examples=200, deadline=None)
def test_the_plans_fast_mode_lookup_agrees_with_region_for(regions, root, paths):
    """The plan counts files per region with a per-directory lookup; it must pick what ``region_for`` picks."""
    table = [Region("/", root, "", "")] + [Region(p, m, "", "") for p, m in regions.items()]
    lookup = _ModeLookup(table)
    for path in paths + paths:  # the second round is answered from what the first one kept
        assert lookup(path) == region_for(table, path).mode
