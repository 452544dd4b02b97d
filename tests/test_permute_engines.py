"""The vocab-mode cloud package on existing engines: a Hugging Face directory that transformers loads
and generates from, and a GGUF file for llama.cpp that the gguf reader reads back.

Reference: plain Hugging Face generation of the untransformed model (and stories260K's reference ids
from llama2.c's run.c). The llama.cpp and vLLM runs themselves are opt-in
(bench/engines/check_engines.sh); here the GGUF file is checked tensor by tensor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from veil.assets import stories260k_path
from veil.permute import KeyBundleError, load_source
from veil.permute.developer import make_key, make_packages
from veil.permute.engines import VocabMap, export_gguf, export_hf, gguf_tensors
from veil.permute.testing import random_model

STORIES_GREEDY = [461, 461, 401, 401, 401, 461, 378, 455, 473, 456, 435, 299, 362, 409, 283, 264, 283, 452, 288, 13]


def greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def stories_vocab():
    src = load_source(stories260k_path())
    key, meta = make_key(src, "vocab", seed=17)
    cloud, user = make_packages(src, key, meta)
    return src, key, cloud, user


def test_hf_directory_generates_the_reference_ids_after_mapping(stories_vocab, tmp_path):
    from transformers import AutoModelForCausalLM

    src, key, cloud, user = stories_vocab
    export_hf(cloud, tmp_path / "hf", sigma_inv=key.vocab_inverse)
    assert {p.name for p in tmp_path.joinpath("hf").iterdir()} >= {"config.json", "model.safetensors"}
    engine = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    vm = VocabMap(user)
    prompt = vm.to_cloud([1])
    assert prompt != [1]
    cloud_ids = greedy(engine, prompt, 40)
    mapped = vm.from_cloud(cloud_ids)
    assert mapped[:20] == STORIES_GREEDY
    assert mapped == greedy(src.model, [1], 40)
    assert cloud_ids[:20] != STORIES_GREEDY  # the engine saw relabelled ids


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gpt_neox"])
def test_hf_export_of_other_families(family, tmp_path):
    from transformers import AutoModelForCausalLM

    src = random_model(family, seed=4)
    key, meta = make_key(src, "vocab", seed=3)
    cloud, user = make_packages(src, key, meta)
    export_hf(cloud, tmp_path / family)
    engine = AutoModelForCausalLM.from_pretrained(tmp_path / family, local_files_only=True)
    vm = VocabMap(user)
    assert vm.from_cloud(greedy(engine, vm.to_cloud([1, 9, 4]), 12)) == greedy(src.model, [1, 9, 4], 12)


def test_embed_mode_packages_are_not_engine_checkpoints(stories_vocab, tmp_path):
    src = stories_vocab[0]
    key, meta = make_key(src, "embed", seed=1)
    cloud, user = make_packages(src, key, meta)
    with pytest.raises(KeyBundleError, match="vocab-mode"):
        export_hf(cloud, tmp_path / "x")
    with pytest.raises(KeyBundleError, match="vocab-mode"):
        VocabMap(user)


def test_gguf_file_reads_back_with_the_transformed_weights(stories_vocab, tmp_path):
    from gguf import GGUFReader

    src, key, cloud, _ = stories_vocab
    path = export_gguf(cloud, tmp_path / "stories.gguf", sigma_inv=key.vocab_inverse)
    reader = GGUFReader(str(path))
    expected = gguf_tensors(cloud)
    got = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert set(got) == set(expected)
    for name, arr in expected.items():
        np.testing.assert_array_equal(got[name].reshape(arr.shape), arr, err_msg=name)
    fields = {k: f for k, f in reader.fields.items()}

    def scalar(name):
        f = fields[name]
        return f.parts[f.data[0]].tolist()[0]

    assert scalar("llama.block_count") == 5 and scalar("llama.embedding_length") == 64
    assert scalar("llama.attention.head_count_kv") == 4
    assert scalar("tokenizer.ggml.eos_token_id") == int(key.vocab_inverse[2])
    first_token = bytes(fields["tokenizer.ggml.tokens"].parts[fields["tokenizer.ggml.tokens"].data[0]]).decode()
    assert first_token == "<veil-0>"  # placeholder names: no real vocabulary in the cloud's file
    # the GGUF embedding table is the relabelled, permuted one, not the original
    emb = src.state_dict()["model.embed_tokens.weight"].numpy()
    np.testing.assert_array_equal(expected["token_embd.weight"], emb[key.vocab][:, key.hidden])
    # q rows are in llama.cpp's interleaved rotary layout: undoing it gives the HF transformed weights
    q = expected["blk.0.attn_q.weight"].reshape(8, 4, 2, 64).swapaxes(1, 2).reshape(64, 64)
    np.testing.assert_array_equal(q, cloud.state_dict["model.layers.0.self_attn.q_proj.weight"].numpy())
