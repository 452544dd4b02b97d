"""The vendors' root certificates veil trusts, shipped as package data (they are public).

AMD: per product line, the ASK (signs VCEKs) and the ARK (the root, signs itself and the ASK),
from AMD's key distribution service (``https://kdsintf.amd.com/vcek/v1/{product}/cert_chain``).
Intel: the Intel SGX Root CA (``https://certificates.trustedservices.intel.com/Intel_SGX_Provisioning_Certification_RootCA.pem``),
root of the PCK chain and of the TCB-info/QE-identity signing chain.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from cryptography import x509

from veil.attested.hardware.certs import load_certificate, load_pem_chain

__all__ = ["AMD_PRODUCTS", "amd_ask_ark", "intel_sgx_root"]

AMD_PRODUCTS = ("Milan", "Genoa", "Turin")


def _read(name: str) -> bytes:
    return resources.files("veil.attested.hardware").joinpath("roots").joinpath(name).read_bytes()


@cache
def amd_ask_ark(product: str) -> tuple[x509.Certificate, x509.Certificate]:
    """(ASK, ARK) of an AMD product line shipped with veil."""
    ask, ark = load_pem_chain(_read(f"ask_ark_{product.lower()}.pem"), f"AMD {product} ASK/ARK")
    return ask, ark


@cache
def intel_sgx_root() -> x509.Certificate:
    return load_certificate(_read("intel_sgx_root_ca.pem"), "Intel SGX Root CA")
