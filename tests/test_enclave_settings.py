"""Enclave settings: SCONE's size notation, page rounding, limits and the dlopen modes."""

from __future__ import annotations

import pytest

from sconify.enclave.settings import DlopenMode, EnclaveSettings, format_size, parse_size
from sconify.errors import UsageError


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4096", 4096), ("64K", 64 * 1024), ("64M", 64 * 1024 * 1024), ("1G", 1 << 30), ("2T", 2 << 40),
     ("64m", 64 << 20), ("64MB", 64 << 20), ("64MiB", 64 << 20), (" 1g ", 1 << 30), (12345, 12345)],
)
def test_sizes_in_scone_notation(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "12Q", "1.5G", "-1", "0x1000", "64 M B", "ten"])
def test_malformed_sizes_are_refused_with_an_example(text: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_size(text, "heap size")
    assert err.value.message.startswith(f"heap size '{text}' is not a size")
    assert "64M" in err.value.message


@pytest.mark.parametrize(("n", "text"), [(64 << 20, "64M"), (1 << 30, "1G"), (4096, "4K"), (5000, "5000"),
                                         (3 << 40, "3T"), (1536 << 10, "1536K")])
def test_format_size_is_exact_and_parses_back(n: int, text: str) -> None:
    assert format_size(n) == text
    assert parse_size(text) == n


def test_from_options_rounds_sizes_up_to_pages_and_keeps_defaults() -> None:
    s = EnclaveSettings.from_options(heap="1000", stack=4097)
    assert (s.heap, s.stack) == (4096, 8192)
    assert EnclaveSettings.from_options() == EnclaveSettings()
    assert EnclaveSettings.from_options(heap="64M", threads=2, dlopen="protected", debug=True) == EnclaveSettings(
        heap=64 << 20, threads=2, dlopen=DlopenMode.PROTECTED, debug=True
    )


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"heap": 1000}, "not a positive multiple of 4096"),
        ({"heap": 0}, "not a positive multiple of 4096"),
        ({"stack": 2 << 30}, "larger than the supported 1G"),
        ({"heap": 2 << 40}, "larger than the supported 1T"),
        ({"threads": 0}, "outside 1..4096"),
        ({"threads": 5000}, "outside 1..4096"),
        ({"threads": True}, "whole number"),
        ({"debug": "yes"}, "true or false"),
        ({"dlopen": "sometimes"}, "off (0), protected (1) or unprotected (2)"),
    ],
)
def test_out_of_range_settings_are_refused(kwargs: dict[str, object], expected: str) -> None:
    with pytest.raises(UsageError) as err:
        EnclaveSettings(**kwargs)  # type: ignore[arg-type]
    assert expected in err.value.message


@pytest.mark.parametrize(
    ("value", "mode"),
    [("off", DlopenMode.OFF), ("0", DlopenMode.OFF), (1, DlopenMode.PROTECTED), ("Protected", DlopenMode.PROTECTED),
     ("2", DlopenMode.UNPROTECTED), ("unprotected", DlopenMode.UNPROTECTED)],
)
def test_dlopen_modes_by_name_or_scone_number(value: str | int, mode: DlopenMode) -> None:
    assert DlopenMode.parse(value) is mode


def test_settings_as_json() -> None:
    s = EnclaveSettings(heap=8 << 20, stack=64 << 10, threads=3, dlopen=DlopenMode.UNPROTECTED, debug=True)
    assert s.to_dict() == {"heap": 8 << 20, "stack": 64 << 10, "threads": 3, "dlopen": "unprotected", "debug": True}
