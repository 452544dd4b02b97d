"""The cloud on existing serving engines: the vocab-mode package as a standard checkpoint.

In ``vocab`` mode the transformed model is an ordinary model of its family whose token ids are
relabelled by ``sigma``: any engine that runs the family runs it unchanged. The cloud is given
permuted prompt ids, samples permuted ids with its usual sampler (greedy decoding and sampling
commute with a relabelling of the vocabulary), and the user maps what comes back with
:class:`VocabMap`.

* :func:`export_hf`: a Hugging Face directory (``config.json`` + ``model.safetensors``) that
  ``AutoModelForCausalLM.from_pretrained`` loads and ``generate`` runs (and vLLM serves with
  ``--skip-tokenizer-init``, taking and returning token ids).
* :func:`export_gguf`: a GGUF file for llama.cpp (llama-cpp-python), for Llama-architecture models.
  Its vocabulary holds placeholder names (``<veil-0>``...), never the real tokens.

The exported config names the permuted BOS/EOS/pad ids so engines stop where the model would: the
cloud learns which permuted id is end-of-sequence (it could also guess it from traffic).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from veil.errors import InputError
from veil.permute.bundle import CloudPackage, UserBundle
from veil.permute.errors import KeyBundleError, UnsupportedFamilyError
from veil.permute.families import adapter_for, supported_families
from veil.permute.models import build_module, config_from_dict

__all__ = ["VocabMap", "export_hf", "export_gguf", "gguf_tensors"]


class VocabMap:
    """The user's side of an engine-served vocab-mode model: real ids to the cloud's ids and back."""

    def __init__(self, bundle: UserBundle):
        if bundle.key.vocab is None:
            raise KeyBundleError("an engine-served model needs a vocab-mode bundle (the embed mode's cloud has "
                                 "no embedding table and no head: use `veil permute serve`)")
        self.sigma = np.asarray(bundle.key.vocab, dtype=np.int64)
        self.sigma_inv = np.argsort(self.sigma).astype(np.int64)

    def to_cloud(self, ids: Any) -> list[int]:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= len(self.sigma)):
            raise InputError(f"token ids must lie in 0..{len(self.sigma) - 1}")
        return self.sigma_inv[arr].tolist()

    def from_cloud(self, ids: Any) -> list[int]:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= len(self.sigma)):
            raise InputError(f"cloud token ids must lie in 0..{len(self.sigma) - 1}")
        return self.sigma[arr].tolist()


def _vocab_package(package: CloudPackage) -> tuple[Any, Any]:
    if package.meta.get("mode") != "vocab":
        raise KeyBundleError(f"only a vocab-mode cloud package is a standard checkpoint; this one is "
                             f"{package.meta.get('mode')!r} mode")
    config = config_from_dict(package.config)
    adapter = adapter_for(config)
    if not adapter.is_decoder:
        raise UnsupportedFamilyError(adapter.family, supported_families(), "engine export is for decoders")
    return config, adapter


def _relabel_special_ids(config: Any, sigma_inv: np.ndarray) -> None:
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int) and 0 <= value < len(sigma_inv):
            setattr(config, name, int(sigma_inv[value]))
        elif isinstance(value, list):
            setattr(config, name, [int(sigma_inv[v]) for v in value])


def export_hf(package: CloudPackage, out: str | Path, sigma_inv: np.ndarray | None = None) -> Path:
    """Write the vocab-mode cloud package as a Hugging Face model directory.

    ``sigma_inv`` (the developer has it): relabel the config's BOS/EOS/pad ids; without it they are
    removed, so an engine never stops early on a real token's old id."""
    config, adapter = _vocab_package(package)
    model = build_module(adapter, config, package.state_dict, base_only=False)
    cfg = model.config
    if sigma_inv is not None:
        _relabel_special_ids(cfg, np.asarray(sigma_inv))
    else:
        cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = None
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(gen, name, getattr(cfg, name, None))
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    return out


def _rope_interleave(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face's rotary layout (halves) to llama.cpp's (adjacent pairs), row blocks per head."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(package: CloudPackage) -> dict[str, np.ndarray]:
    """The GGUF tensors (llama.cpp names, float32) of a vocab-mode Llama-architecture package."""
    config, adapter = _vocab_package(package)
    if config.model_type not in ("llama", "mistral"):
        raise UnsupportedFamilyError(config.model_type, supported_families(),
                                     "GGUF export is implemented for the Llama architecture (llama, mistral)")
    sd = {k: v.float().numpy() for k, v in package.state_dict.items()}
    heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads or config.num_attention_heads)
    out: dict[str, np.ndarray] = {"token_embd.weight": sd["model.embed_tokens.weight"],
                                  "output_norm.weight": sd["model.norm.weight"]}
    if "lm_head.weight" in sd:
        out["output.weight"] = sd["lm_head.weight"]
    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight"}
    for i in range(int(config.num_hidden_layers)):
        p = f"model.layers.{i}."
        for hf, gg in names.items():
            out[f"blk.{i}.{gg}"] = sd[p + hf]
        out[f"blk.{i}.attn_q.weight"] = _rope_interleave(sd[p + "self_attn.q_proj.weight"], heads)
        out[f"blk.{i}.attn_k.weight"] = _rope_interleave(sd[p + "self_attn.k_proj.weight"], kv_heads)
    known = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{n}" for i in range(int(config.num_hidden_layers))
        for n in list(names) + ["self_attn.q_proj.weight", "self_attn.k_proj.weight"]}
    extra = sorted(set(sd) - known)
    if extra:
        raise UnsupportedFamilyError(config.model_type, supported_families(),
                                     f"GGUF export does not know parameters {extra[:3]} (biases? q/k norms?)")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def export_gguf(package: CloudPackage, out: str | Path, sigma_inv: np.ndarray | None = None) -> Path:
    """Write a vocab-mode Llama-architecture package as a float32 GGUF file for llama.cpp."""
    import gguf

    config, _ = _vocab_package(package)
    tensors = gguf_tensors(package)
    out = Path(out)
    cfg = config
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)) if isinstance(rope, dict) else 10000.0)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("veil permuted model")
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(heads)
    w.add_head_count_kv(int(cfg.num_key_value_heads or heads))
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = int(cfg.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<veil-{i}>" for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([gguf.TokenType.NORMAL] * vocab)
    special = {"bos": getattr(cfg, "bos_token_id", None), "eos": getattr(cfg, "eos_token_id", None)}
    if sigma_inv is not None:
        for name, value in special.items():
            if isinstance(value, int) and 0 <= value < vocab:
                getattr(w, f"add_{name}_token_id")(int(np.asarray(sigma_inv)[value]))
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
