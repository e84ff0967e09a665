"""The JSON Schema of ``sconify analyze --json`` (schema_version 1); prose in docs/analysis-schema.md.

Stability: within one schema_version, fields are only added, never removed or changed in meaning;
consumers should ignore fields they do not know. A change that breaks that raises schema_version.
"""

from __future__ import annotations

from typing import Any

from sconify.analyze.findings import PROBLEM_CODES
from sconify.rules.schema import DLOPEN_MODES, INTERPRETER_KINDS, LIBC_FLAVOURS, MODES

_STR_LIST = {"type": "array", "items": {"type": "string"}}
_NULLABLE_STR = {"type": ["string", "null"]}


def _object(properties: dict[str, Any], required: list[str] | None = None, closed: bool = True) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required if required is not None else list(properties),
        "additionalProperties": not closed,
    }


_FINDING = _object({"code": {"type": "string"}, "message": {"type": "string"}, "path": _NULLABLE_STR,
                    "rule": {"type": "string"}}, required=["code", "message", "path"])
_LIBRARY = _object({"name": {"type": "string"}, "needed_by": {"type": "string"}, "path": _NULLABLE_STR,
                    "via": {"enum": ["rpath", "runpath", "LD_LIBRARY_PATH", "ld.so.conf", "default", "path",
                                     "musl path", "PT_INTERP", ""]}})
_ELF = _object({
    "path": {"type": "string"},
    "class": {"enum": [0, 32, 64]},
    "machine": {"type": "string"},
    "type": {"type": "string"},
    "static": {"type": "boolean"},
    "pie": {"type": "boolean"},
    "interpreter": _NULLABLE_STR,
    "libc": {"enum": list(LIBC_FLAVOURS)},
    "needed": _STR_LIST,
    "rpath": _STR_LIST,
    "runpath": _STR_LIST,
    "libraries": {"type": "array", "items": _LIBRARY},
    "missing": {"type": "array", "items": _LIBRARY},
    "error": _NULLABLE_STR,
})
_STR_OR_NULL_LIST = {"type": ["array", "null"], "items": {"type": "string"}}

ANALYSIS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://sconify.invalid/schemas/analysis-1.json",
    "title": "sconify analyze --json",
    **_object({
        "schema_version": {"const": 1},
        "source": {"type": "string"},
        "digest": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"},
        "platform": {"type": "string"},
        "convertible": {"type": "boolean"},
        "problems": {"type": "array", "items": {**_FINDING, "properties": {
            **_FINDING["properties"], "code": {"enum": list(PROBLEM_CODES)}}}},
        "warnings": {"type": "array", "items": _FINDING},
        "notes": {"type": "array", "items": _FINDING},
        "command": _object({"entrypoint": _STR_OR_NULL_LIST, "cmd": _STR_OR_NULL_LIST,
                            "shell_form": {"type": "boolean"}}),
        "argv": _STR_LIST,
        "executable": _NULLABLE_STR,
        "final_argv": _STR_LIST,
        "chain": {"type": "array", "items": _object({
            "kind": {"enum": ["command", "path-lookup", "symlink", "shebang", "env", "shell-script", "wrapper",
                              "shell-inline", "program", "referenced"]},
            "path": {"type": "string"},
            "detail": {"type": "string"},
        })},
        "programs": {"type": "array", "items": _ELF},
        "elf": {"oneOf": [{"type": "null"}, _ELF]},
        "user": _object({"spec": {"type": "string"}, "uid": {"type": ["integer", "null"]},
                         "gid": {"type": ["integer", "null"]}, "name": _NULLABLE_STR, "group": _NULLABLE_STR,
                         "home": {"type": "string"},
                         "additional_gids": {"type": "array", "items": {"type": "integer"}}}),
        "workdir": {"type": "string"},
        "env": _STR_LIST,
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "volumes": _STR_LIST,
        "interpreter": {"oneOf": [{"type": "null"}, _object({
            "kind": {"enum": [k for k in INTERPRETER_KINDS if k != "none"]},
            "binary": {"type": "string"},
            "version": _NULLABLE_STR,
            "script": _NULLABLE_STR,
            "module": _NULLABLE_STR,
            "inline": {"type": "boolean"},
            "code_trees": {"type": "array", "items": _object({"path": {"type": "string"}, "role": {"type": "string"}})},
        })]},
        "libraries": {"type": "array", "items": _LIBRARY},
        "scripts": _STR_LIST,
        "regions": {"type": "array", "minItems": 1, "items": _object({
            "path": {"type": "string", "pattern": "^/"},
            "mode": {"enum": list(MODES)},
            "reason": {"type": "string"},
            "rule": {"type": "string"},
        })},
        "enclave": _object({
            "heap": {"type": "integer", "minimum": 0},
            "stack": {"type": "integer", "minimum": 0},
            "threads": {"type": "integer", "minimum": 1},
            "dlopen": {"enum": list(DLOPEN_MODES)},
            "rules": {"type": "object", "additionalProperties": {"type": "string"}},
        }),
        "environment": {"type": "array", "items": _object({"name": {"type": "string"}, "value": {"type": "string"},
                                                           "rule": {"type": "string"}})},
        "rules": _object({
            "matched": _STR_LIST,
            "replaced": {"type": "array", "items": _object({"name": {"type": "string"}, "shipped": {"type": "string"},
                                                            "by": {"type": "string"}})},
        }),
        "tree": _object({
            "entries": {"type": "integer"},
            "files": {"type": "integer"},
            "directories": {"type": "integer"},
            "symlinks": {"type": "integer"},
            "other": {"type": "integer"},
            "bytes": {"type": "integer"},
            "setuid": _STR_LIST,
            "setuid_count": {"type": "integer"},
            "layers": {"type": "array", "items": _object({
                "index": {"type": "integer"},
                "digest": {"type": "string"},
                "media_type": {"type": "string"},
                "size": {"type": "integer"},
                "entries": {"type": "integer"},
                "whiteouts": {"type": "integer"},
                "regular_bytes": {"type": "integer"},
                "visible_entries": {"type": "integer"},
                "visible_bytes": {"type": "integer"},
            })},
        }),
        "reads": _object({
            "layer_reads": {"type": "array", "items": {"type": "integer"}},
            "rounds": {"type": "integer"},
            "compressed_bytes": {"type": "integer"},
            "uncompressed_bytes": {"type": "integer"},
            "header_pass_compressed_bytes": {"type": "integer"},
            "header_pass_uncompressed_bytes": {"type": "integer"},
            "content_bytes": {"type": "integer"},
            "files_fetched": {"type": "integer"},
        }),
    }),
}
