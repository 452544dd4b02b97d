"""Load a llama2.c checkpoint (``.bin``, legacy version-0 format) into Hugging Face's Llama class.

Layout: seven little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len), then float32 weights in the order token_embedding, rms_att, wq, wk, wv, wo, rms_ffn,
w1, w2, w3, rms_final, freq_cis_real, freq_cis_imag, [classifier when vocab_size < 0].
Matrices are row-major ``(out_features, in_features)``, as torch's ``nn.Linear`` stores them.

llama2.c rotates adjacent pairs ``(x[2i], x[2i+1])`` of each head; Hugging Face's Llama rotates
``(x[i], x[i + head_dim/2])``. Both compute the same attention scores if the rows of wq and wk are
reordered inside each head as ``[0, 2, 4, ..., 1, 3, 5, ...]`` (q.k is a sum over all head
dimensions, so a common reordering of q and k leaves it unchanged).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from veil.errors import ModelFormatError

__all__ = ["load_llama2c", "llama2c_config"]

_HEADER = struct.Struct("<7i")


def _read_header(raw: bytes, path: Path) -> tuple[int, ...]:
    if len(raw) < _HEADER.size:
        raise ModelFormatError(f"{path}: {len(raw)} bytes is too short for a llama2.c header")
    header = _HEADER.unpack_from(raw)
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = header
    if min(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len) <= 0 or dim % heads or heads % kv_heads:
        raise ModelFormatError(f"{path}: header {header} is not a valid llama2.c header")
    return header


def llama2c_config(path: str | Path):
    """The ``LlamaConfig`` a llama2.c checkpoint describes."""
    from transformers import LlamaConfig

    path = Path(path)
    with path.open("rb") as fh:
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = _read_header(fh.read(_HEADER.size), path)
    # transformers 5 typed LlamaConfig without rope_theta; it still accepts it (-> rope_parameters), 4.x needs it
    return LlamaConfig(  # type: ignore[call-arg]
        vocab_size=abs(vocab), hidden_size=dim, intermediate_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=seq_len,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=vocab > 0, hidden_act="silu",
        bos_token_id=1, eos_token_id=2, pad_token_id=None, attention_bias=False, mlp_bias=False,
    )


def _rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from interleaved pairs to halves (see the module docstring)."""
    out_f, in_f = w.shape
    head_dim = out_f // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, in_f).transpose(0, 2, 1, 3).reshape(out_f, in_f)


def load_llama2c(path: str | Path):
    """A ``LlamaForCausalLM`` (eval mode, float32) with the weights of a llama2.c checkpoint."""
    from transformers import LlamaForCausalLM

    path = Path(path)
    raw = path.read_bytes()
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = _read_header(raw, path)
    shared = vocab > 0
    vocab = abs(vocab)
    head_size = dim // heads
    kv_dim = dim * kv_heads // heads
    floats = np.frombuffer(raw, dtype="<f4", offset=_HEADER.size)
    shapes = [
        ("tok", (vocab, dim)), ("rms_att", (layers, dim)), ("wq", (layers, dim, dim)),
        ("wk", (layers, kv_dim, dim)), ("wv", (layers, kv_dim, dim)), ("wo", (layers, dim, dim)),
        ("rms_ffn", (layers, dim)), ("w1", (layers, hidden, dim)), ("w2", (layers, dim, hidden)),
        ("w3", (layers, hidden, dim)), ("rms_final", (dim,)),
        ("freq_real", (seq_len, head_size // 2)), ("freq_imag", (seq_len, head_size // 2)),
    ]
    if not shared:
        shapes.append(("cls", (vocab, dim)))
    need = sum(int(np.prod(s)) for _, s in shapes)
    if floats.size != need:
        raise ModelFormatError(
            f"{path}: holds {floats.size} float32 values after the header; the header implies {need}"
        )
    arrays, pos = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        arrays[name] = floats[pos:pos + n].reshape(shape)
        pos += n

    sd: dict[str, np.ndarray] = {"model.embed_tokens.weight": arrays["tok"], "model.norm.weight": arrays["rms_final"]}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = arrays["rms_att"][i]
        sd[p + "post_attention_layernorm.weight"] = arrays["rms_ffn"][i]
        sd[p + "self_attn.q_proj.weight"] = _rope_rows(arrays["wq"][i], heads)
        sd[p + "self_attn.k_proj.weight"] = _rope_rows(arrays["wk"][i], kv_heads)
        sd[p + "self_attn.v_proj.weight"] = arrays["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = arrays["wo"][i]
        sd[p + "mlp.gate_proj.weight"] = arrays["w1"][i]
        sd[p + "mlp.down_proj.weight"] = arrays["w2"][i]
        sd[p + "mlp.up_proj.weight"] = arrays["w3"][i]
    sd["lm_head.weight"] = arrays["tok"] if shared else arrays["cls"]

    model = LlamaForCausalLM(llama2c_config(path))
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise ModelFormatError(f"{path}: weights do not fit LlamaForCausalLM (missing {missing}, unexpected {unexpected})")
    if shared:
        model.tie_weights()
    model.eval()
    return model
