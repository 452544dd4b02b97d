"""Serve the prepared GGUF files with llama.cpp (llama-cpp-python) and compare the mapped ids with
Hugging Face's reference ids. Needs only llama-cpp-python and NumPy (run in the engine's venv).

    python bench/engines/check_llamacpp.py --cases build/engines
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run(case_dir: Path) -> tuple[str, bool, str]:
    import numpy as np
    from llama_cpp import Llama

    case = json.loads((case_dir / "case.json").read_text())
    sigma = np.array(case["sigma"])
    llm = Llama(model_path=str(case_dir / "model.gguf"), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    # greedy by hand on the engine's logits (independent of its sampler settings)
    llm.reset()
    tokens = list(case["cloud_prompt"])
    llm.eval(tokens)
    out: list[int] = []
    for _ in range(case["tokens"]):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    mapped = sigma[np.array(out)].tolist()
    # and the engine's own sampler at temperature 0
    gen = []
    for t in llm.generate(list(case["cloud_prompt"]), temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        gen.append(int(t))
        if len(gen) == case["tokens"]:
            break
    ok = mapped == case["reference"] and sigma[np.array(gen)].tolist() == case["reference"]
    return case["name"], ok, f"first mapped ids {mapped[:6]}, reference {case['reference'][:6]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=Path, default=Path("build/engines"))
    args = ap.parse_args()
    import llama_cpp

    print(f"llama-cpp-python {llama_cpp.__version__}")
    failed = 0
    for case_dir in sorted(p.parent for p in args.cases.glob("*/case.json")):
        name, ok, detail = run(case_dir)
        failed += not ok
        print(f"| llama.cpp | {name} | {'identical' if ok else 'DIFFERENT'} | {detail} |")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
