"""The JSON Schema of a rule file, and the names rule files may use in ``${...}`` region paths."""

from __future__ import annotations

from typing import Any

MODES = ("encrypted", "authenticated", "not-protected")
DLOPEN_MODES = ("disabled", "authenticated", "unrestricted")
INTERPRETER_KINDS = ("python", "node", "java", "ruby", "perl", "php", "shell", "none")
LIBC_FLAVOURS = ("glibc", "musl", "none", "unknown")

# Variables a region path may use as ${NAME}; each stands for zero or more absolute paths taken from the
# analysis. ``code.ROLE`` (any role an interpreter reports, e.g. code.stdlib) is accepted as well.
VARIABLES = {
    "workdir": "the image's working directory (only when it is not /)",
    "home": "the home directory of the image's user (only when it is not /)",
    "executable": "the program that finally runs, after symlinks, shebangs and wrappers",
    "executable_dir": "the directory of that program",
    "interpreter": "the interpreter binary (python3.11, node, java, ...) when the program is one",
    "script": "the script or entry file the interpreter runs",
    "scripts": "every script the command runs on its way: wrapper scripts, shebang scripts, the main script",
    "app": "the application's own code and configuration (its directory, or the file when it sits in a "
           "system directory)",
    "programs": "every ELF program the command executes (shells of wrapper scripts, env, the final program)",
    "libraries": "every shared library those programs load at start (DT_NEEDED, resolved in the image)",
    "volumes": "the image's VOLUME paths",
}
CODE_PREFIX = "code."

_STRINGS = {"oneOf": [{"type": "string", "minLength": 1},
                      {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}]}
_SIZE = {
    "oneOf": [
        {"type": "integer", "minimum": 4096},
        {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?\s*([KMGTkmgt](i?B)?|B)?$"},
    ]
}

CONDITION: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "executable": {**_STRINGS, "description": "globs on the program's path or name, any step of the chain"},
        "interpreter": {
            "oneOf": [{"enum": list(INTERPRETER_KINDS)},
                      {"type": "array", "items": {"enum": list(INTERPRETER_KINDS)}, "minItems": 1}]
        },
        "argv": {**_STRINGS, "description": "globs on argv items (whole item or its last path component)"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"},
                   "description": "label name -> glob on its value ('*': present)"},
        "paths": {**_STRINGS, "description": "absolute paths (a glob in the last component) present in the image"},
        "env": {**_STRINGS, "description": "globs on the names of the image's environment variables"},
        "elf": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "static": {"type": "boolean"},
                "pie": {"type": "boolean"},
                "libc": {"enum": list(LIBC_FLAVOURS)},
            },
        },
    },
}

MATCH: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        **CONDITION["properties"],
        "any": {"type": "array", "items": CONDITION, "minItems": 1},
    },
}

RULE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://sconify.invalid/schemas/rule-1.json",
    "title": "sconify rule file",
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9._-]{0,63}$"},
        "description": {"type": "string"},
        "priority": {"type": "integer", "minimum": -1000, "maximum": 1000},
        "match": MATCH,
        "regions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["path", "mode", "reason"],
                "properties": {
                    "path": {"type": "string", "pattern": r"^(/|\$\{)"},
                    "mode": {"enum": list(MODES)},
                    "reason": {"type": "string", "minLength": 1},
                    "only_if_exists": {"type": "boolean"},
                },
            },
        },
        "enclave": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "heap": _SIZE,
                "stack": _SIZE,
                "threads": {"type": "integer", "minimum": 1, "maximum": 4096},
                "dlopen": {"enum": list(DLOPEN_MODES)},
            },
        },
        "env": {
            "type": "object",
            "propertyNames": {"pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},
            "additionalProperties": {"type": "string"},
        },
        "notes": {"type": "array", "items": {"type": "string", "minLength": 1}},
    },
}
