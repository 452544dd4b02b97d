"""Adapters: what the transform, the cloud and the user need to know about a model.

There is no per-family table. An adapter is made in two steps:

* :func:`adapter_for` (from a Hugging Face config alone, as the cloud has it): is the model a decoder
  (a causal language model: logits out, KV cache) or an encoder (a masked-LM family used for hidden
  states), and which ``transformers`` Auto class builds it. Encoder-decoder models are refused.
* :func:`analyse_model` (from the weights, as the developer has them): which axis of which parameter
  carries the residual stream, found by :mod:`veil.permute.analysis` from the operations one forward
  pass performs, then checked numerically on random tokens with a random key. A model whose axes
  cannot be proven permutable (an operation that depends on the order of the hidden axis, a
  projection between the embedding and the residual stream, a constant meeting the stream, ...) is
  refused with :class:`UnsupportedFamilyError` naming the reason.

``TESTED_FAMILIES`` lists the ``model_type`` values the test suite checks (tiny random models, every
norm parameter and bias random); other families are accepted when the analysis proves them exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from veil.permute.errors import UnsupportedFamilyError

__all__ = ["Rule", "FamilyAdapter", "TESTED_FAMILIES", "adapter_for", "analyse_model", "io_names",
           "supported_families"]

TESTED_FAMILIES = ("bert", "distilbert", "falcon", "gemma", "gemma2", "gpt2", "gpt_neox", "llama", "mistral",
                   "opt", "phi3", "qwen2", "qwen3", "roberta")


@dataclass(frozen=True)
class Rule:
    """How one parameter is permuted: its residual axes, its vocabulary axes, its role."""

    hidden: tuple[int, ...] = ()
    vocab: tuple[int, ...] = ()
    role: str | None = None  # "embedding" (token table) or "head" (output head)


@dataclass(frozen=True, eq=False)
class FamilyAdapter:
    """Facts about one model. ``rules`` is filled by :func:`analyse_model` (empty on the cloud)."""

    family: str
    is_decoder: bool
    rules: dict[str, Rule] = field(default_factory=dict)
    embedding_name: str = ""
    head_name: str | None = None
    is_tied: bool = False
    embedding_scale: float = 1.0
    logit_softcap: float | None = None  # decoders: logits = cap * tanh(head(h) / cap)
    logit_scale: float = 1.0  # decoders: logits = scale * head(h) (Cohere, Granite)
    embed_problem: str | None = None  # why the embed mode cannot serve this model (None: it can)

    # --- config ---------------------------------------------------------------------------------
    def hidden_size(self, config: Any) -> int:
        return int(config.hidden_size)

    def vocab_size(self, config: Any) -> int:
        return int(config.vocab_size)

    def max_positions(self, config: Any) -> int:
        for attr in ("max_position_embeddings", "n_positions"):
            value = getattr(config, attr, None)
            if value:
                return int(value)
        raise UnsupportedFamilyError(self.family, supported_families(), "config names no maximum length")

    def tied(self, config: Any = None) -> bool:
        return self.is_tied

    # --- modules --------------------------------------------------------------------------------
    @property
    def model_class(self) -> str:
        return "AutoModelForCausalLM" if self.is_decoder else "AutoModel"

    def auto_class(self):
        import transformers

        return getattr(transformers, self.model_class)

    def build(self, config: Any):
        """A randomly initialised full model for ``config``, float32, in eval mode."""
        model = self.auto_class().from_config(config, dtype=torch.float32)
        model.eval()
        return model

    def base(self, model):
        """The base model (hidden states out, no head)."""
        return model.base_model

    # --- rules ----------------------------------------------------------------------------------
    def is_ignored(self, name: str) -> bool:
        return False

    def rule_for(self, name: str) -> Rule:
        rule = self.rules.get(name)
        if rule is None:
            why = "the model was not analysed" if not self.rules else "the analysed model has no such parameter"
            raise UnsupportedFamilyError(self.family, supported_families(), f"parameter {name!r}: {why}")
        return rule


def supported_families() -> list[str]:
    """The families the test suite checks (others are accepted when the analysis proves them exact)."""
    return list(TESTED_FAMILIES)


def adapter_for(config: Any) -> FamilyAdapter:
    """The config-level adapter: decoder or encoder, or :class:`UnsupportedFamilyError`."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = str(getattr(config, "model_type", "") or "")
    if not model_type:
        raise UnsupportedFamilyError("<none>", supported_families(), "the config has no model_type")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedFamilyError(model_type, supported_families(),
                                     "encoder-decoder models (two stacks with cross-attention) are not supported")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        if getattr(config, "is_decoder", False):
            raise UnsupportedFamilyError(model_type, supported_families(),
                                         "a masked-LM family configured as a decoder is not supported")
        return FamilyAdapter(family=model_type, is_decoder=False)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return FamilyAdapter(family=model_type, is_decoder=True)
    raise UnsupportedFamilyError(model_type, supported_families(),
                                 "neither a causal language model nor a masked-LM encoder in transformers")


def io_names(model: Any) -> tuple[str, str | None, bool]:
    """State-dict names of the token embedding table and the output head (None for encoders built
    with AutoModel), and whether the head is the embedding table itself."""
    emb = model.get_input_embeddings().weight
    head_mod = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = None if head_mod is None else head_mod.weight
    emb_name = head_name = None
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is emb and emb_name is None:
            emb_name = name
        elif head is not None and p is head and head_name is None and name != emb_name:
            head_name = name
    if emb_name is None:
        raise UnsupportedFamilyError(type(model).__name__, supported_families(), "no token embedding parameter")
    return emb_name, head_name, head is not None and head is emb


def analyse_model(model: Any, verify: bool = True) -> FamilyAdapter:
    """The full adapter for a loaded model: residual and vocabulary axes of every parameter, found by
    tracing (:mod:`veil.permute.analysis`) and, with ``verify``, checked on random tokens."""
    from veil.permute.analysis import analyse_residual

    config = model.config
    kind = adapter_for(config)
    d = kind.hidden_size(config)
    vocab = kind.vocab_size(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 5), generator=g)
    result = analyse_residual(model, kind.base(model), d, kind.is_decoder, ids)
    if not result.exact:
        raise UnsupportedFamilyError(kind.family, supported_families(),
                                     "cannot prove the permutation exact: " + "; ".join(result.problems[:4]))
    emb_name, head_name, tied = io_names(model)
    if not kind.is_decoder:
        head_name, tied = None, False
    rules: dict[str, Rule] = {}
    for name in model.state_dict():
        role = "embedding" if name == emb_name else "head" if name == head_name else None
        rules[name] = Rule(hidden=result.hidden_axes.get(name, ()), vocab=result.vocab_axes.get(name, ()), role=role)
    softcap, logit_scale, embed_problem = _user_head(model, result) if kind.is_decoder else (None, 1.0, None)
    adapter = FamilyAdapter(family=kind.family, is_decoder=kind.is_decoder, rules=rules, embedding_name=emb_name,
                            head_name=head_name, is_tied=tied, embedding_scale=result.embedding_scale,
                            logit_softcap=softcap, logit_scale=logit_scale, embed_problem=embed_problem)
    if verify:
        verify_exact(model, adapter, ids)
    return adapter


def _user_head(model: Any, result: Any) -> tuple[float | None, float, str | None]:
    """In embed mode the user applies the head: is it ``h @ W^T``, times a constant (Cohere's
    ``logit_scale``, Granite's ``1 / logits_scaling``), optionally soft-capped as
    ``cap * tanh(x / cap)`` with the config's ``final_logit_softcapping`` (Gemma2)? Returns
    (softcap, scale, problem)."""
    head = model.get_output_embeddings()
    h, logits = result.head_input, result.logits
    if head is None or h is None or logits is None:
        return None, 1.0, "the output head's input could not be observed"
    if getattr(head, "bias", None) is not None:
        return None, 1.0, "the output head has a bias, which the user bundle does not carry"
    with torch.no_grad():
        plain = torch.nn.functional.linear(h, head.weight).double()
        target = logits.double()
        if plain.shape != target.shape:
            return None, 1.0, "the logits do not have the head's shape"
        cap = getattr(model.config, "final_logit_softcapping", None)
        for softcap in (None, cap) if cap else (None,):
            t = target if softcap is None else softcap * torch.atanh((target / softcap).clamp(-1 + 1e-12, 1 - 1e-12))
            scale = float((t * plain).sum() / (plain * plain).sum().clamp_min(1e-30))
            pred = plain * scale
            if softcap is not None:
                pred = softcap * torch.tanh(pred / softcap)
            if torch.allclose(pred, target, rtol=1e-4, atol=1e-5):
                return (None if softcap is None else float(softcap)), (1.0 if abs(scale - 1) < 1e-6 else scale), None
    return None, 1.0, "the logits are not a (scaled, soft-capped) product with the output head"


def verify_exact(model: Any, adapter: FamilyAdapter, ids: torch.Tensor, tol: float = 1e-3) -> float:
    """Run the model with transformed weights on ``ids`` as both modes do and compare with the
    original: ``vocab`` (random hidden and vocabulary permutations, token ids in) and ``embed``
    (hidden permutation only, the scaled embeddings ``E[t] * scale`` permuted in). A difference
    larger than ``tol`` times the output's scale is :class:`UnsupportedFamilyError`. Returns the
    largest relative difference."""
    from torch.func import functional_call

    from veil.permute.transform import generate_key, transform_state_dict

    config = model.config
    d, vocab = adapter.hidden_size(config), adapter.vocab_size(config)
    kwargs: dict[str, Any] = {"use_cache": False} if adapter.is_decoder else {}
    worst = 0.0
    with torch.no_grad():
        ref = model(input_ids=ids, **kwargs)
        ref_out = ref.logits if adapter.is_decoder else ref.last_hidden_state
        embedded = torch.nn.functional.embedding(ids, model.get_input_embeddings().weight) * adapter.embedding_scale
        for mode in ("vocab", "embed"):
            key = generate_key(d, vocab if mode == "vocab" else None, seed=7)
            sd = transform_state_dict(adapter, config, model.state_dict(), key)
            pi, pi_inv = torch.from_numpy(key.hidden), torch.from_numpy(key.hidden_inverse)
            if mode == "vocab":
                sigma_inv = torch.from_numpy(key.vocab_inverse)  # type: ignore[arg-type]
                inputs: dict[str, Any] = {"input_ids": sigma_inv[ids]}
            else:
                inputs = {"inputs_embeds": embedded[..., pi]}
            out = functional_call(model, sd, (), {**inputs, **kwargs}, tie_weights=True, strict=False)
            if adapter.is_decoder:
                got = out.logits[..., sigma_inv] if mode == "vocab" else out.logits
            else:
                got = out.last_hidden_state[..., pi_inv]
            err = float((ref_out - got).abs().max() / ref_out.abs().max().clamp_min(1e-12))
            if not err <= tol:
                raise UnsupportedFamilyError(adapter.family, supported_families(),
                                             f"the transformed weights do not reproduce the model in {mode} mode "
                                             f"(relative difference {err:.2e} on random tokens)")
            worst = max(worst, err)
    return worst
