"""Enclave measurement and signature: MRENCLAVE, the SGXS stream, SIGSTRUCT and enclave signing keys.

The converter calls ``measure(runtime, executable, settings)`` and ``sign(body, key)``; the layout
behind the measurement is specified in ``docs/enclave.md``.
"""

from sconify.enclave.keys import generate_enclave_key, load_enclave_key, load_enclave_public_key
from sconify.enclave.layout import EnclaveLayout, build_layout
from sconify.enclave.measurement import Measurement, measure
from sconify.enclave.settings import DlopenMode, EnclaveSettings, parse_size
from sconify.enclave.sgxs import parse_sgxs
from sconify.enclave.sigstruct import Sigstruct, SigstructBody, attach_signature, sign

__all__ = [
    "DlopenMode",
    "EnclaveLayout",
    "EnclaveSettings",
    "Measurement",
    "Sigstruct",
    "SigstructBody",
    "attach_signature",
    "build_layout",
    "generate_enclave_key",
    "load_enclave_key",
    "load_enclave_public_key",
    "measure",
    "parse_sgxs",
    "parse_size",
    "sign",
]
