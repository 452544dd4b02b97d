"""Serve the prepared Hugging Face directories with vLLM's OpenAI server (token ids in and out, no
tokenizer) and compare the mapped ids with Hugging Face's reference ids. Standard library + vLLM.

    python bench/engines/check_vllm.py --cases build/engines

Cases whose head_dim is below 32 are skipped (vLLM's CPU attention needs head_dim >= 32).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def run(case_dir: Path) -> tuple[str, str, str]:
    case = json.loads((case_dir / "case.json").read_text())
    if case["head_dim"] < 32:
        return case["name"], "skipped", f"head_dim {case['head_dim']} < 32"
    port = free_port()
    model = str(case_dir / "hf")
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                             "--skip-tokenizer-init", "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", "float32", "--max-model-len", "256"])
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    return case["name"], "FAILED", "server did not start"
                time.sleep(2)
        data = post(f"http://127.0.0.1:{port}/v1/completions",
                    {"model": model, "prompt": case["cloud_prompt"], "max_tokens": case["tokens"],
                     "temperature": 0, "return_token_ids": True, "ignore_eos": True})
        ids = data["choices"][0]["token_ids"]
        mapped = [case["sigma"][i] for i in ids]
        ok = mapped == case["reference"]
        return case["name"], "identical" if ok else "DIFFERENT", f"first mapped ids {mapped[:6]}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=Path, default=Path("build/engines"))
    args = ap.parse_args()
    failed = 0
    for case_dir in sorted(p.parent for p in args.cases.glob("*/case.json")):
        name, verdict, detail = run(case_dir)
        failed += verdict not in ("identical", "skipped")
        print(f"| vLLM | {name} | {verdict} | {detail} |")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
