"""The JSON Schema of the part of SCONE's CAS session language (v0.3) that sconify emits, and a checker that
names every problem by its path in the document (docs/session.md)."""

from __future__ import annotations

from typing import Any

from sconify.policy.secrets import SECRET_KINDS

_NAME = {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"}
_SECRET_NAME = {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"}
_HEX64 = {"type": "string", "pattern": r"^[0-9a-fA-F]{64}$"}
_ABS = {"type": "string", "pattern": r"^/[^\x00]*$"}

_SECRET_COMMON = {
    "name": _SECRET_NAME,
    "kind": {"enum": list(SECRET_KINDS)},
    "export_public": {"type": "boolean"},
}
_SECRET_BY_KIND: list[dict[str, Any]] = [
    {
        "if": {"properties": {"kind": {"enum": ["ascii", "binary"]}}},
        "then": {"properties": {**_SECRET_COMMON, "size": {"type": "integer", "minimum": 1, "maximum": 4096}},
                 "additionalProperties": False},
    },
    {
        "if": {"properties": {"kind": {"const": "private-key"}}},
        "then": {"properties": _SECRET_COMMON, "additionalProperties": False},
    },
    {
        "if": {"properties": {"kind": {"const": "x509"}}},
        "then": {
            "properties": {
                **_SECRET_COMMON,
                "private_key": _SECRET_NAME,
                "issuer": _SECRET_NAME,
                "common_name": {"type": "string", "minLength": 1},
                "dns": {"type": "array", "items": {"type": "string", "minLength": 1}},
                "ip": {"type": "array", "items": {"type": "string", "minLength": 1}},
                "endpoint": {"enum": ["server", "client"]},
                "valid_for": {"type": "string"},
            },
            "additionalProperties": False,
        },
    },
    {
        "if": {"properties": {"kind": {"const": "x509-ca"}}},
        "then": {
            "properties": {
                **_SECRET_COMMON,
                "private_key": _SECRET_NAME,
                "issuer": _SECRET_NAME,
                "common_name": {"type": "string", "minLength": 1},
                "valid_for": {"type": "string"},
            },
            "additionalProperties": False,
        },
    },
]

SESSION_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://sconify.invalid/schemas/session-0.3.json",
    "title": "CAS session (the subset sconify emits)",
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "version", "services"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,255}$"},
        "version": {"type": "string", "pattern": r"^0\.3(\.[0-9]+)?$"},
        "access_policy": {
            "type": "object",
            "additionalProperties": False,
            "properties": {k: {"type": "array", "items": {"type": "string"}} for k in ("read", "update", "create")},
        },
        "services": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "image_name", "mrenclaves", "command"],
                "properties": {
                    "name": _NAME,
                    "image_name": _NAME,
                    "mrenclaves": {"type": "array", "minItems": 1, "items": _HEX64},
                    "command": {"type": "string", "minLength": 1},
                    "environment": {"type": "object", "additionalProperties": {"type": "string"}},
                    "pwd": _ABS,
                    "fspf_path": _ABS,
                    "fspf_key": _HEX64,
                    "fspf_tag": {"type": "string", "pattern": r"^[0-9a-fA-F]{32}$"},
                },
                "dependentRequired": {"fspf_path": ["fspf_key", "fspf_tag"]},
            },
        },
        "images": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    "name": _NAME,
                    "injection_files": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["path", "content"],
                            "properties": {"path": _ABS, "content": {"type": "string"}},
                        },
                    },
                    "volumes": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["name", "path"],
                            "properties": {"name": _NAME, "path": _ABS},
                        },
                    },
                },
            },
        },
        "volumes": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                # No fspf_key / fspf_tag: the CAS generates a volume's key on first use; sconify never does.
                "properties": {"name": _NAME, "export": {"type": "array"}, "import": {"type": "object"}},
            },
        },
        "secrets": {
            "type": "array",
            "items": {"type": "object", "required": ["name", "kind"], "properties": _SECRET_COMMON,
                      "allOf": _SECRET_BY_KIND},
        },
        "security": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "attestation": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "mode": {"enum": ["hardware", "none"]},
                        "tolerate": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                        "ignore_advisories": {
                            "oneOf": [{"const": "*"}, {"type": "array", "items": {"type": "string"}}]
                        },
                    },
                }
            },
        },
    },
}

def session_errors(data: Any) -> list[str]:
    """Every way ``data`` departs from the schema, as ``path: message`` lines (empty when it conforms)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(SESSION_SCHEMA)
    out = []
    for error in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        where = "/".join(str(p) for p in error.absolute_path) or "(top)"
        out.append(f"{where}: {error.message}")
    return out
