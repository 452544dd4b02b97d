"""The server's trusted side: what runs inside the TEE and speaks for it.

It owns the platform handle, the TLS identity it generated (the private key never leaves it), and
builds evidence on request:

1. receive the client's nonce (16 to 64 random bytes, hex);
2. write the claims: code measurement, ``{model id: sha256}`` of the loaded models, SHA-256 of the
   TLS SubjectPublicKeyInfo, the nonce, the time, the platform and the runtime versions;
3. ask the platform for a report whose report data is ``SHA-512(claims)``;
4. return claims + report + endorsements as :class:`Evidence`.
"""

from __future__ import annotations

import platform as _py_platform

import onnxruntime as ort

from veil.attested.evidence import Evidence, make_claims, report_data_for
from veil.attested.platform import TrustedPlatform
from veil.attested.tlskeys import TlsIdentity

__all__ = ["TrustedSide"]


def _veil_version() -> str:
    import veil

    return getattr(veil, "__version__", "unknown")


class TrustedSide:
    def __init__(self, platform: TrustedPlatform, tls: TlsIdentity):
        self.platform = platform
        self.tls = tls
        self.measurement = platform.measurement()
        self.runtime = {"veil": _veil_version(), "onnxruntime": ort.__version__,
                        "python": _py_platform.python_version()}

    def evidence(self, nonce: str, models: dict[str, str]) -> Evidence:
        claims = make_claims(platform=self.platform.name, code_measurement=self.measurement, models=models,
                             tls_spki_sha256=self.tls.spki_sha256, nonce=nonce, runtime=self.runtime)
        report, endorsements = self.platform.report(report_data_for(claims))
        return Evidence(self.platform.name, claims, report, endorsements)
