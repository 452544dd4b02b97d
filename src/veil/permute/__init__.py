"""permute mode: STIP secure transformer inference (Yuan, Zhang, Li, ePrint 2023/1763).

Three roles. The *developer* draws a secret permutation ``pi`` of the hidden dimension (and,
optionally, ``sigma`` of the vocabulary), transforms the model so that ``f'(x pi) = f(x) pi``,
gives ``f'`` to the *cloud* and the key bundle to the *user*. The user permutes its input, the
cloud runs ``f'`` unchanged Hugging Face code, the user un-permutes what comes back.

This is obfuscation, not cryptography: see docs/permute.md and ``veil permute audit``.
"""

from veil.permute.bundle import (
    CloudPackage,
    UserBundle,
    read_cloud_package,
    read_key,
    read_user_bundle,
    write_cloud_package,
    write_key,
    write_user_bundle,
)
from veil.permute.client import HttpTransport, LocalTransport, PermuteClient
from veil.permute.cloud import CloudRuntime
from veil.permute.developer import make_key, make_packages
from veil.permute.errors import (
    CloudAuthError,
    CloudError,
    KeyBundleError,
    PermuteError,
    SequenceTooLongError,
    UnsupportedFamilyError,
)
from veil.permute.families import (
    TESTED_FAMILIES,
    FamilyAdapter,
    adapter_for,
    analyse_model,
    supported_families,
)
from veil.permute.models import SourceModel, build_module, load_source, source_from_model
from veil.permute.transform import PermutationKey, generate_key, inverse, transform_state_dict

__all__ = [
    "TESTED_FAMILIES",
    "analyse_model",
    "source_from_model",
    "CloudAuthError",
    "CloudError",
    "CloudPackage",
    "CloudRuntime",
    "HttpTransport",
    "LocalTransport",
    "PermuteClient",
    "UserBundle",
    "make_key",
    "make_packages",
    "read_cloud_package",
    "read_key",
    "read_user_bundle",
    "write_cloud_package",
    "write_key",
    "write_user_bundle",
    "FamilyAdapter",
    "KeyBundleError",
    "PermutationKey",
    "PermuteError",
    "SequenceTooLongError",
    "SourceModel",
    "UnsupportedFamilyError",
    "adapter_for",
    "build_module",
    "generate_key",
    "inverse",
    "load_source",
    "supported_families",
    "transform_state_dict",
]
