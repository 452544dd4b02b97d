"""Prepare the engine checks: vocab-mode transformed models as a Hugging Face directory and a GGUF
file, the user's relabelling, and plain Hugging Face reference ids (run in veil's environment).

Cases: stories260K (shipped with veil; head_dim 8) and a random Llama with head_dim 32 (vLLM's CPU
attention needs head_dim >= 32). Each case directory gets ``hf/``, ``model.gguf`` and ``case.json``
(prompt, the prompt the cloud sees, sigma, and the reference ids). The engine scripts need only the
standard library, NumPy and the engine.

    python bench/engines/prepare.py --out build/engines
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from veil.assets import stories260k_path
from veil.permute import load_source
from veil.permute.developer import make_key, make_packages
from veil.permute.engines import VocabMap, export_gguf, export_hf
from veil.permute.testing import random_model


def greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prepare(name: str, src, out: Path, prompt: list[int], n: int) -> None:
    key, meta = make_key(src, "vocab", seed=2024)  # fixed seed: a benchmark, not a deployment
    cloud, user = make_packages(src, key, meta)
    case = out / name
    export_hf(cloud, case / "hf")  # no special ids: engines run exactly n tokens
    export_gguf(cloud, case / "model.gguf")
    vm = VocabMap(user)
    data = {"name": name, "prompt": prompt, "cloud_prompt": vm.to_cloud(prompt), "tokens": n,
            "sigma": [int(s) for s in vm.sigma], "reference": greedy(src.model, prompt, n),
            "head_dim": int(src.config.hidden_size // src.config.num_attention_heads)}
    (case / "case.json").write_text(json.dumps(data))
    print(f"{name}: {case} (reference {data['reference'][:8]}...)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("build/engines"))
    ap.add_argument("--tokens", type=int, default=40)
    args = ap.parse_args()
    prepare("stories260K", load_source(stories260k_path()), args.out, [1], args.tokens)
    llama = random_model("llama", seed=5, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=256, vocab_size=512, max_position_embeddings=256)
    prepare("llama-hd32", llama, args.out, [1, 17, 42], args.tokens)


if __name__ == "__main__":
    main()
