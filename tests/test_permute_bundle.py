"""Key bundles and cloud packages: round trip, and clear typed errors for every kind of bad file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from veil.errors import IntegrityError, VeilError
from veil.permute import KeyBundleError, SequenceTooLongError
from veil.permute.bundle import (
    read_cloud_package,
    read_key,
    read_user_bundle,
    write_cloud_package,
    write_key,
    write_user_bundle,
)
from veil.permute.client import LocalTransport, PermuteClient
from veil.permute.cloud import CloudRuntime
from veil.permute.developer import make_key, make_packages
from veil.permute.testing import random_llama


@pytest.fixture(scope="module")
def src():
    return random_llama(seed=5, layers=1, positions=32)


@pytest.fixture(scope="module")
def written(src, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for mode in ("embed", "vocab"):
        key, meta = make_key(src, mode)
        write_key(root / f"key-{mode}", key, meta)
        key2, meta2 = read_key(root / f"key-{mode}")
        cloud, user = make_packages(src, key2, meta2)
        write_cloud_package(root / f"cloud-{mode}", cloud)
        write_user_bundle(root / f"user-{mode}", user)
        out[mode] = (root / f"key-{mode}", root / f"cloud-{mode}", root / f"user-{mode}")
    return out


def copy(path, tmp_path):
    dst = tmp_path / path.name
    shutil.copytree(path, dst)
    return dst


@pytest.mark.parametrize("mode", ["embed", "vocab"])
def test_round_trip_through_files_is_exact(src, written, mode):
    _, cloud_dir, user_dir = written[mode]
    client = PermuteClient(read_user_bundle(user_dir), LocalTransport(CloudRuntime(read_cloud_package(cloud_dir))))
    ids = np.array([[1, 4, 9, 16, 25]])
    with torch.no_grad():
        ref = src.model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(client.forward(ids), ref, rtol=1e-4, atol=1e-4)


def test_embed_mode_cloud_never_gets_embedding_or_head(written):
    pkg = read_cloud_package(written["embed"][1])
    assert "model.embed_tokens.weight" not in pkg.state_dict and "lm_head.weight" not in pkg.state_dict
    user = read_user_bundle(written["embed"][2])
    assert user.embedding is not None and user.head is not None


def test_keys_are_fresh_and_valid(src):
    k1, _ = make_key(src, "vocab")
    k2, _ = make_key(src, "vocab")
    assert k1.key_id != k2.key_id and not np.array_equal(k1.hidden, k2.hidden)
    assert sorted(k1.vocab.tolist()) == list(range(src.config.vocab_size))


@pytest.mark.parametrize("fname", ["keys.safetensors", "user_weights.safetensors"])
def test_corrupted_user_file_is_detected(written, tmp_path, fname):
    d = copy(written["embed"][2], tmp_path)
    data = bytearray((d / fname).read_bytes())
    data[len(data) // 2] ^= 0x01
    (d / fname).write_bytes(bytes(data))
    with pytest.raises(KeyBundleError, match=f"{fname}.*SHA-256"):
        read_user_bundle(d)


def test_edited_manifest_is_detected(written, tmp_path):
    d = copy(written["vocab"][2], tmp_path)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["meta"]["max_positions"] = 10_000
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KeyBundleError, match="check value"):
        read_user_bundle(d)


def test_key_file_swapped_from_another_bundle_with_updated_hash_is_detected(written, tmp_path, src):
    """Even with the SHA-256 in the manifest fixed up, the keyed check catches the mix."""
    import hashlib

    d = copy(written["vocab"][2], tmp_path)
    other, meta = make_key(src, "vocab")
    write_key(tmp_path / "other", other, meta)
    new = (tmp_path / "other" / "keys.safetensors").read_bytes()
    (d / "keys.safetensors").write_bytes(new)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"]["keys.safetensors"] = hashlib.sha256(new).hexdigest()
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KeyBundleError, match="check value"):
        read_user_bundle(d)


def test_wrong_kind_of_directory_and_missing_files(written, tmp_path):
    with pytest.raises(KeyBundleError, match="veil-permute-cloud/1.*expected 'veil-permute-user/1'"):
        read_user_bundle(written["embed"][1])
    with pytest.raises(KeyBundleError, match="no manifest.json"):
        read_user_bundle(tmp_path)
    d = copy(written["embed"][2], tmp_path)
    (d / "keys.safetensors").unlink()
    with pytest.raises(KeyBundleError, match="missing"):
        read_user_bundle(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(KeyBundleError, match="not valid JSON"):
        read_user_bundle(d)


def test_corrupted_cloud_model_is_detected(written, tmp_path):
    d = copy(written["embed"][1], tmp_path)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-5] ^= 0x40
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(KeyBundleError, match="model.safetensors.*SHA-256"):
        read_cloud_package(d)


def test_bundle_for_another_cloud_is_refused(written):
    runtime = CloudRuntime(read_cloud_package(written["embed"][1]))
    other_mode_bundle = read_user_bundle(written["vocab"][2])
    with pytest.raises(KeyBundleError, match="different transformed model"):
        PermuteClient(other_mode_bundle, LocalTransport(runtime))


def test_bundle_errors_are_integrity_errors():
    assert issubclass(KeyBundleError, IntegrityError) and issubclass(KeyBundleError, VeilError)


def test_error_messages_hold_no_key_material(written, tmp_path):
    d = copy(written["vocab"][2], tmp_path)
    bundle = read_user_bundle(written["vocab"][2])
    (d / "manifest.json").write_text((d / "manifest.json").read_text().replace('"check": "', '"check": "0'))
    with pytest.raises(KeyBundleError) as info:
        read_user_bundle(d)
    assert str(bundle.key.hidden.tolist()[:4])[1:-1] not in str(info.value)


@pytest.mark.parametrize("mode", ["embed", "vocab"])
def test_too_long_sequences_are_refused_by_client_and_cloud(written, mode):
    _, cloud_dir, user_dir = written[mode]
    runtime = CloudRuntime(read_cloud_package(cloud_dir))
    client = PermuteClient(read_user_bundle(user_dir), LocalTransport(runtime))
    with pytest.raises(SequenceTooLongError, match="33 positions.*32"):
        client.forward(np.ones((1, 33), dtype=np.int64))
    with pytest.raises(SequenceTooLongError):
        client.generate([1, 2, 3], 31)
    # the cloud checks on its own too: a session cannot grow past the limit
    sid = runtime.open_session()
    (out,) = runtime.step_batch([(sid, client.permute_input(np.ones(30, dtype=np.int64)))])
    assert not isinstance(out, Exception)
    (err,) = runtime.step_batch([(sid, client.permute_input(np.ones(3, dtype=np.int64)))])
    assert isinstance(err, SequenceTooLongError)
    assert client.generate([1, 2, 3], 30)  # exactly at the limit is fine


def test_key_for_another_model_is_refused_by_transform(src):
    from veil.permute.testing import random_gpt2

    key, meta = make_key(random_gpt2(seed=1), "embed")
    with pytest.raises(KeyBundleError, match="family='gpt2'"):
        make_packages(src, key, meta)


def test_developer_signatures(src, tmp_path):
    """Signed packages verify with the developer's public key; a forger who rewrites a bundle and
    recomputes every hash and check value cannot produce the signature."""
    from veil.permute.bundle import read_signing_key
    from veil.permute.signing import new_signing_key, public_key_hex

    key, meta = make_key(src, "vocab")
    write_key(tmp_path / "key", key, meta)
    sk = read_signing_key(tmp_path / "key")
    pub = public_key_hex(sk)
    assert read_key(tmp_path / "key")[1]["developer_public_key"] == pub
    cloud, user = make_packages(src, key, meta)
    write_user_bundle(tmp_path / "user", user, sk)
    write_cloud_package(tmp_path / "cloud", cloud, sk)
    read_user_bundle(tmp_path / "user", pub)
    read_cloud_package(tmp_path / "cloud", pub)

    other = public_key_hex(new_signing_key())
    with pytest.raises(KeyBundleError, match="does not verify"):
        read_user_bundle(tmp_path / "user", other)
    write_user_bundle(tmp_path / "unsigned", user)
    with pytest.raises(KeyBundleError, match="not signed"):
        read_user_bundle(tmp_path / "unsigned", pub)
    # forger: a bundle with its own key, signed by someone else, carrying the developer's key_id
    forged_key, _ = make_key(src, "vocab")
    forged = type(user)(key=type(key)(forged_key.hidden, forged_key.vocab, key.key_id), meta=dict(user.meta))
    write_user_bundle(tmp_path / "forged", forged, new_signing_key())
    read_user_bundle(tmp_path / "forged")  # self-consistent, so only a signature check can catch it
    with pytest.raises(KeyBundleError, match="does not verify"):
        read_user_bundle(tmp_path / "forged", pub)
    with pytest.raises(KeyBundleError, match="64 hex digits"):
        read_user_bundle(tmp_path / "user", "not-hex")


def test_sentence_pooling_modes_match_their_definitions(tmp_path):
    """`pool` against the formulas of sentence-transformers' Pooling (cls, max, mean, mean_sqrt_len,
    concatenated in that order), and a sentence-transformers directory read into those settings."""
    import json

    import numpy as np
    import pytest

    from veil.errors import ModelFormatError
    from veil.permute.sentence import pool, read_sentence_config

    rng = np.random.default_rng(0)
    h = rng.normal(size=(2, 5, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    m = mask[..., None].astype(np.float32)
    mean = (h * m).sum(1) / m.sum(1)
    mx = np.stack([h[0, :3].max(0), h[1].max(0)])
    np.testing.assert_allclose(pool(h, mask), mean, rtol=1e-6)
    np.testing.assert_allclose(pool(h, mask, ["mean", "cls", "max", "mean_sqrt_len"]),
                               np.concatenate([h[:, 0], mx, mean, (h * m).sum(1) / np.sqrt(m.sum(1))], -1), rtol=1e-6)
    with pytest.raises(ModelFormatError, match="lasttoken"):
        pool(h, mask, ["lasttoken"])
    d = tmp_path / "st"
    (d / "1_Pooling").mkdir(parents=True)
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": True}))
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                             "pooling_mode_mean_tokens": False}))
    assert read_sentence_config(d) == {"max_seq_length": 128, "do_lower_case": True, "pooling": ["cls"],
                                       "normalize": False}
    assert read_sentence_config(tmp_path) is None
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": "long"}))
    with pytest.raises(ModelFormatError, match="max_seq_length"):
        read_sentence_config(d)
