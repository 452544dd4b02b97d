"""Per-family adapters: which parameters of a Hugging Face model carry the residual stream.

The transform in :mod:`veil.permute.transform` is generic. All it needs from a family is a table of
rules, one per kind of parameter (matched by a regular expression on the state-dict name):

* ``hidden``: the axes of the parameter that index the residual stream (size d). The STIP rule
  ``y = x W`` becomes, for torch's ``(out, in)`` weights, "input side takes pi" (axis 1 of the
  query/key/value and first feed-forward weights), "output side takes pi" (axis 0 of the attention
  output and last feed-forward weights, and their biases), and norm gains/biases (axis 0).
  GPT-2's ``Conv1D`` stores ``(in, out)``, so its axes are the other way round.
* ``vocab``: the axes that index the vocabulary (the token embedding rows and the head rows),
  permuted only when a vocabulary permutation is used.
* ``role``: ``"embedding"`` for the token embedding table, ``"head"`` for the output head.

Every parameter of a model must match exactly one rule (parameters that carry no residual axis,
such as the query bias, match a rule with no axes). A parameter no rule knows makes the adapter
refuse the model: a silent skip is how the authors' code lost the norm parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from veil.permute.errors import UnsupportedFamilyError

__all__ = ["Rule", "FamilyAdapter", "ADAPTERS", "adapter_for", "supported_families"]


@dataclass(frozen=True)
class Rule:
    """How one kind of parameter is permuted."""

    pattern: str
    hidden: tuple[int, ...] = ()
    vocab: tuple[int, ...] = ()
    role: str | None = None

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None


@dataclass(frozen=True)
class FamilyAdapter:
    """What the transform, the cloud and the user need to know about one model family."""

    family: str
    model_types: tuple[str, ...]
    is_decoder: bool
    base_attr: str | None  # attribute of the full model that holds the base (no head); None: full is base
    rules: tuple[Rule, ...] = field(default_factory=tuple)
    embedding_name: str = ""
    head_name: str | None = None
    ignored: tuple[str, ...] = ()  # buffers that may appear in checkpoints and carry no weights

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

    def tied(self, config: Any) -> bool:
        return self.head_name is not None and bool(getattr(config, "tie_word_embeddings", False))

    # --- modules --------------------------------------------------------------------------------
    def build(self, config: Any):
        """A randomly initialised full model of this family, in eval mode."""
        import transformers

        cls = getattr(transformers, self.model_class)
        model = cls(config)
        model.eval()
        return model

    @property
    def model_class(self) -> str:
        return {"bert": "BertModel", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[self.family]

    def base(self, model):
        """The base model (hidden states out, no head)."""
        return model if self.base_attr is None else getattr(model, self.base_attr)

    # --- rules ----------------------------------------------------------------------------------
    def is_ignored(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.ignored)

    def rule_for(self, name: str) -> Rule:
        found = [r for r in self.rules if r.matches(name)]
        if len(found) != 1:
            why = "no rule" if not found else f"{len(found)} rules"
            raise UnsupportedFamilyError(
                self.family, supported_families(),
                f"parameter {name!r} matches {why}; this checkpoint is a variant the adapter does not know",
            )
        return found[0]


_L = r"\d+"

BERT = FamilyAdapter(
    family="bert",
    model_types=("bert",),
    is_decoder=False,
    base_attr=None,
    embedding_name="embeddings.word_embeddings.weight",
    head_name=None,
    ignored=(r"embeddings\.position_ids", r"embeddings\.token_type_ids"),
    rules=(
        Rule(r"embeddings\.word_embeddings\.weight", hidden=(1,), vocab=(0,), role="embedding"),
        Rule(r"embeddings\.(position|token_type)_embeddings\.weight", hidden=(1,)),
        Rule(r"embeddings\.LayerNorm\.(weight|bias)", hidden=(0,)),
        Rule(rf"encoder\.layer\.{_L}\.attention\.self\.(query|key|value)\.weight", hidden=(1,)),
        Rule(rf"encoder\.layer\.{_L}\.attention\.self\.(query|key|value)\.bias"),
        Rule(rf"encoder\.layer\.{_L}\.attention\.output\.dense\.(weight|bias)", hidden=(0,)),
        Rule(rf"encoder\.layer\.{_L}\.(attention\.output|output)\.LayerNorm\.(weight|bias)", hidden=(0,)),
        Rule(rf"encoder\.layer\.{_L}\.intermediate\.dense\.weight", hidden=(1,)),
        Rule(rf"encoder\.layer\.{_L}\.intermediate\.dense\.bias"),
        Rule(rf"encoder\.layer\.{_L}\.output\.dense\.(weight|bias)", hidden=(0,)),
        # the pooler is tanh(W h_cls + b): permuting both sides makes its output permuted too
        Rule(r"pooler\.dense\.weight", hidden=(0, 1)),
        Rule(r"pooler\.dense\.bias", hidden=(0,)),
    ),
)

GPT2 = FamilyAdapter(
    family="gpt2",
    model_types=("gpt2",),
    is_decoder=True,
    base_attr="transformer",
    embedding_name="transformer.wte.weight",
    head_name="lm_head.weight",
    ignored=(rf"transformer\.h\.{_L}\.attn\.(bias|masked_bias)",),
    rules=(
        Rule(r"transformer\.wte\.weight", hidden=(1,), vocab=(0,), role="embedding"),
        Rule(r"transformer\.wpe\.weight", hidden=(1,)),
        Rule(rf"transformer\.h\.{_L}\.ln_[12]\.(weight|bias)", hidden=(0,)),
        Rule(r"transformer\.ln_f\.(weight|bias)", hidden=(0,)),
        # Conv1D weights are (in, out)
        Rule(rf"transformer\.h\.{_L}\.(attn\.c_attn|mlp\.c_fc)\.weight", hidden=(0,)),
        Rule(rf"transformer\.h\.{_L}\.(attn\.c_attn|mlp\.c_fc)\.bias"),
        Rule(rf"transformer\.h\.{_L}\.(attn|mlp)\.c_proj\.weight", hidden=(1,)),
        Rule(rf"transformer\.h\.{_L}\.(attn|mlp)\.c_proj\.bias", hidden=(0,)),
        Rule(r"lm_head\.weight", hidden=(1,), vocab=(0,), role="head"),
    ),
)

LLAMA = FamilyAdapter(
    family="llama",
    model_types=("llama",),
    is_decoder=True,
    base_attr="model",
    embedding_name="model.embed_tokens.weight",
    head_name="lm_head.weight",
    ignored=(rf"model\.layers\.{_L}\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq"),
    rules=(
        Rule(r"model\.embed_tokens\.weight", hidden=(1,), vocab=(0,), role="embedding"),
        Rule(rf"model\.layers\.{_L}\.self_attn\.[qkv]_proj\.weight", hidden=(1,)),
        Rule(rf"model\.layers\.{_L}\.self_attn\.[qkv]_proj\.bias"),
        Rule(rf"model\.layers\.{_L}\.self_attn\.o_proj\.(weight|bias)", hidden=(0,)),
        Rule(rf"model\.layers\.{_L}\.mlp\.(gate|up)_proj\.weight", hidden=(1,)),
        Rule(rf"model\.layers\.{_L}\.mlp\.(gate|up)_proj\.bias"),
        Rule(rf"model\.layers\.{_L}\.mlp\.down_proj\.(weight|bias)", hidden=(0,)),
        Rule(rf"model\.layers\.{_L}\.(input|post_attention)_layernorm\.weight", hidden=(0,)),
        Rule(r"model\.norm\.weight", hidden=(0,)),
        Rule(r"lm_head\.weight", hidden=(1,), vocab=(0,), role="head"),
    ),
)

ADAPTERS: dict[str, FamilyAdapter] = {a.family: a for a in (BERT, GPT2, LLAMA)}


def supported_families() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(config: Any) -> FamilyAdapter:
    """The adapter for a Hugging Face config (by ``model_type``), or :class:`UnsupportedFamilyError`."""
    model_type = str(getattr(config, "model_type", "") or "")
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            _check_config(adapter, config)
            return adapter
    raise UnsupportedFamilyError(model_type or "<none>", supported_families())


def _check_config(adapter: FamilyAdapter, config: Any) -> None:
    if adapter.family == "bert" and getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise UnsupportedFamilyError(
            "bert", supported_families(),
            f"position_embedding_type={config.position_embedding_type!r}; only 'absolute' is supported",
        )
    if adapter.family == "bert" and getattr(config, "is_decoder", False):
        raise UnsupportedFamilyError("bert", supported_families(), "BERT used as a decoder is not supported")
