"""The server's trusted side: what runs inside the TEE and speaks for it.

It owns the platform handle, the TLS identity it generated (the private key never leaves it), and
builds evidence on request:

1. receive the client's nonce (16 to 64 random bytes, hex);
2. commit to ``{model id: sha256}`` of the loaded models (a fresh salted Merkle tree, see
   :mod:`veil.attested.commitment`);
3. write the claims: code measurement, the commitment's root, SHA-256 of the TLS
   SubjectPublicKeyInfo, the nonce, the time, the platform and the runtime versions;
4. ask the platform for a report whose report data is ``SHA-512(claims)``;
5. return claims + report + endorsements as :class:`Evidence` and, for a client entitled to one
   model, that model's inclusion proof.
"""

from __future__ import annotations

import platform as _py_platform

import onnxruntime as ort

from veil.attested.commitment import InclusionProof, commit_models
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

    def _evidence(self, nonce: str, models: dict[str, str], pad_to: int) -> tuple[Evidence, dict[str, InclusionProof]]:
        root, proofs = commit_models(models, pad_to)
        claims = make_claims(platform=self.platform.name, code_measurement=self.measurement, models_root=root,
                             tls_spki_sha256=self.tls.spki_sha256, nonce=nonce, runtime=self.runtime)
        report, endorsements = self.platform.report(report_data_for(claims))
        return Evidence(self.platform.name, claims, report, endorsements), proofs

    def evidence(self, nonce: str, models: dict[str, str], *, pad_to: int = 1) -> Evidence:
        """Evidence for anyone: the models appear only as a hiding commitment."""
        return self._evidence(nonce, models, pad_to)[0]

    def model_evidence(self, nonce: str, models: dict[str, str], model_id: str, *,
                       pad_to: int = 1) -> tuple[Evidence, InclusionProof]:
        """Evidence plus the inclusion proof of ``model_id`` (for a client entitled to that model)."""
        evidence, proofs = self._evidence(nonce, models, pad_to)
        return evidence, proofs[model_id]
