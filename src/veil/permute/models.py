"""Loading source models and building (transformed) Hugging Face modules for the permute mode.

Sources: a Hugging Face model directory (``config.json`` + weights, loaded offline) or a llama2.c
checkpoint (``.bin``). The module built for the cloud is the family's own Hugging Face class, so the
cloud runs exactly the code the original model runs, on permuted weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from veil.errors import ModelError, ModelFormatError
from veil.permute.families import FamilyAdapter, adapter_for, analyse_model, io_names

__all__ = ["SourceModel", "load_source", "source_from_model", "build_module", "config_from_dict"]


@dataclass
class SourceModel:
    """An original (untransformed) model: its adapter, its config and the full HF module."""

    adapter: FamilyAdapter
    config: Any
    model: torch.nn.Module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())


def load_source(path: str | Path) -> SourceModel:
    """Load a model the permute mode can transform (offline; nothing is downloaded)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".bin":
        from veil.permute.llama2c import load_llama2c

        return source_from_model(load_llama2c(path))
    if path.is_dir() and (path / "config.json").is_file():
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except (ValueError, KeyError, OSError) as exc:
            raise ModelFormatError(f"{path}/config.json is not a Hugging Face config this transformers "
                                   f"version knows ({exc.__class__.__name__})") from None
        kind = adapter_for(config)
        model = kind.auto_class().from_pretrained(path, local_files_only=True, dtype=torch.float32)
        model.eval()
        return source_from_model(model)
    if isinstance(path, Path) and not path.exists():
        raise ModelError(f"model path {str(path)!r} does not exist")
    raise ModelFormatError(
        f"{str(path)!r} is neither a Hugging Face model directory (with config.json) nor a llama2.c .bin file"
    )


def source_from_model(model: torch.nn.Module, verify: bool = True) -> SourceModel:
    """Analyse a loaded Hugging Face model (eval mode) and wrap it as a source; refused with
    :class:`~veil.permute.errors.UnsupportedFamilyError` (and the reason) when not provably exact."""
    model.eval()
    return SourceModel(analyse_model(model, verify=verify), model.config, model)


def config_from_dict(data: dict[str, Any]):
    """A Hugging Face config from its ``to_dict()`` form (checks the family first)."""
    from transformers import AutoConfig

    model_type = data.get("model_type", "")
    try:
        config = AutoConfig.for_model(model_type, **{k: v for k, v in data.items() if k != "model_type"})
    except (ValueError, KeyError) as exc:
        from veil.permute.errors import UnsupportedFamilyError
        from veil.permute.families import supported_families

        raise UnsupportedFamilyError(str(model_type), supported_families(), "unknown model_type") from exc
    adapter_for(config)
    return config


def build_module(adapter: FamilyAdapter, config: Any, state_dict: dict[str, torch.Tensor], *, base_only: bool):
    """The family's HF module with ``state_dict`` loaded (float32, eval mode).

    ``base_only``: return the base model (no head) and replace its token embedding by a one-row
    placeholder, for a cloud that must never hold the embedding (the user holds it). Every parameter
    except the embedding and the head must be in ``state_dict``.
    """
    model = adapter.build(config)
    emb_name, head_name, tied = io_names(model)
    expected_missing = {emb_name, head_name} if base_only else set()
    if not base_only and tied:
        expected_missing.add(head_name)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [m for m in missing if m not in expected_missing]
    if missing or unexpected:
        raise ModelFormatError(
            f"transformed weights do not fit {adapter.model_class}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if not base_only and tied:
        model.tie_weights()
    if base_only:
        base = adapter.base(model)
        base.set_input_embeddings(torch.nn.Embedding(1, adapter.hidden_size(config)))
        base.eval()
        return base
    model.eval()
    return model
