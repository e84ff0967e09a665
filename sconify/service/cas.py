"""Upload of a policy (a CAS session) to a configuration and attestation service: ``POST {url}/v1/sessions``
with the session's YAML as body, over TLS, authenticated by a client certificate."""

from __future__ import annotations

import logging
from pathlib import Path

import requests

from sconify.errors import NetworkError
from sconify.secretfile import read_secret
from sconify.service.config import Cas

log = logging.getLogger(__name__)

SESSION_TYPE = "application/yaml"


def upload_session(cas: Cas, session_file: Path) -> str:
    """Send the session to the CAS; return ``created`` or ``exists`` (HTTP 409: a session of that name is there).

    Any other answer, a TLS failure or an unreachable CAS raises NetworkError, so that the job is tried again.
    """
    body = read_secret(session_file, "policy")
    url = f"{cas.url}/v1/sessions"
    try:
        resp = requests.post(
            url,
            data=body,
            headers={"Content-Type": SESSION_TYPE},
            cert=(cas.cert, cas.key) if cas.cert and cas.key else None,
            verify=cas.ca if cas.ca else True,
            timeout=cas.timeout,
        )
    except requests.exceptions.SSLError as exc:
        raise NetworkError(f"the TLS connection to the CAS at {cas.url} failed ({type(exc).__name__}); check its "
                           "CA certificate ('ca') and the client certificate ('cert', 'key').") from None
    except requests.RequestException as exc:
        raise NetworkError(f"cannot reach the CAS at {cas.url} ({type(exc).__name__}); check that it runs.") from None
    with resp:
        if 200 <= resp.status_code < 300:
            return "created"
        if resp.status_code == 409:
            log.warning("the CAS at %s already has the session of %s; it was not replaced", cas.url, session_file)
            return "exists"
        raise NetworkError(f"the CAS at {cas.url} refused the session with HTTP {resp.status_code} "
                           f"({resp.text[:200].strip() or resp.reason}).")
