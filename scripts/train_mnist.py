#!/usr/bin/env python3
"""Train and export the four SecureNN benchmark MNIST networks (A, B, C, D) shipped with veil.

Data: the official MNIST *test* set (``mnist_test.npz``, 10,000 images; the 60,000 training images are not
available on these machines). Project convention: train on images 0..7999 and report accuracy on images
8000..9999, the "held-out 2k". This is not the standard MNIST split; every accuracy printed here says so.

Steps:
  1. seed torch (``torch.manual_seed``), turn on deterministic algorithms and fix the thread count;
  2. train each network on images 0..7999 with Adam, small batches and a light random shift (+-2 pixels);
  3. export to ONNX (opset 17, input ``x`` float32 (N,1,28,28) = pixels/255, output ``logits`` (N,10),
     dynamic batch axis, weights stored inside the file) and check the graph: onnx.checker, an allowed-op
     list (no Shape/Gather/Concat chains), onnxruntime runs with batch 1 and 64 and agrees with torch;
  4. measure the held-out-2k accuracy with onnxruntime and write ``manifest.json`` (sha256, parameter
     count, accuracy, seed, command) next to the models;
  5. write ``mnist_slice.npz``: the first 256 held-out images (indices 8000..8255) for demos and tests.

Usage: ``python scripts/train_mnist.py [--data PATH] [--out DIR] [--epochs N] [--only A,B] [--seed S]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

__all__ = ["ALLOWED_OPS", "build_model", "main"]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "mnist_test.npz"
DEFAULT_OUT = REPO_ROOT / "src" / "veil" / "assets"

TRAIN_RANGE = (0, 8000)  # images used for training
HELDOUT_RANGE = (8000, 10000)  # the "held-out 2k"
SLICE_SIZE = 256
OPSET = 17
ALLOWED_OPS = frozenset(
    {"Gemm", "MatMul", "Conv", "Relu", "MaxPool", "Flatten", "Reshape", "Add", "Constant", "Identity"}
)
# Per-network defaults: (epochs, learning rate). Chosen to keep all four under ~5 minutes on 2 CPU cores.
TRAIN_CONFIG = {"A": (30, 1e-3), "B": (15, 2e-3), "C": (12, 1e-3), "D": (20, 2e-3)}
BATCH_SIZE = 32


def build_model(name: str) -> nn.Module:
    """Return the untrained PyTorch module for SecureNN network ``name`` (one of A, B, C, D)."""
    if name == "A":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )
    if name == "B":
        return nn.Sequential(
            nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(16, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Flatten(), nn.Linear(256, 100), nn.ReLU(), nn.Linear(100, 10),
        )  # fmt: skip
    if name == "C":
        return nn.Sequential(
            nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10),
        )  # fmt: skip
    if name == "D":
        return nn.Sequential(
            nn.Conv2d(1, 5, 5, stride=2, padding=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(980, 100), nn.ReLU(), nn.Linear(100, 10),
        )  # fmt: skip
    raise ValueError(f"unknown network {name!r}: expected one of A, B, C, D")


def load_data(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load x_test (10000,28,28) uint8 and y_test (10000,) from the shared MNIST test-set file."""
    if not path.is_file():
        sys.exit(f"error: MNIST data file not found: {path} (expected mnist_test.npz with x_test, y_test)")
    with np.load(path) as data:
        x, y = data["x_test"], data["y_test"]
    if x.shape != (10000, 28, 28) or x.dtype != np.uint8 or y.shape != (10000,):
        sys.exit(f"error: unexpected arrays in {path}: x_test {x.shape} {x.dtype}, y_test {y.shape}")
    return x, y


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 (N,28,28) -> float32 (N,1,28,28) in [0, 1], the models' input convention."""
    return (images.astype(np.float32) / 255.0)[:, None, :, :]


def random_shift(batch: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Shift each image by a random integer offset in [-max_shift, max_shift]^2, filling with zeros."""
    n = batch.shape[0]
    padded = nn.functional.pad(batch, (max_shift,) * 4)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    out = torch.empty_like(batch)
    for i in range(n):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = padded[i, :, dy : dy + 28, dx : dx + 28]
    return out


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> None:
    """Adam on cross-entropy, batch BATCH_SIZE, random shifts, cosine-decayed learning rate."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + BATCH_SIZE - 1) // BATCH_SIZE)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), BATCH_SIZE):
            idx = perm[start : start + BATCH_SIZE]
            xb = random_shift(x[idx], gen)
            opt.zero_grad()
            loss = loss_fn(model(xb), y[idx])
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def export_onnx(model: nn.Module, path: Path) -> None:
    """Export with opset 17 and a dynamic batch axis; weights embedded; legacy exporter first."""
    dummy = torch.zeros(1, 1, 28, 28)
    try:
        torch.onnx.export(
            model, (dummy,), str(path), input_names=["x"], output_names=["logits"], opset_version=OPSET,
            dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}}, do_constant_folding=True, dynamo=False,
        )  # fmt: skip
    except Exception as exc:  # legacy exporter unavailable: fall back to the dynamo exporter
        print(f"  legacy exporter failed ({type(exc).__name__}: {exc}); using dynamo=True", flush=True)
        prog = torch.onnx.export(
            model, (dummy,), input_names=["x"], output_names=["logits"], opset_version=OPSET,
            dynamic_shapes={"x": {0: torch.export.Dim("N")}}, dynamo=True, external_data=False,
        )  # fmt: skip
        prog.optimize()
        prog.save(str(path), external_data=False)
    # Re-save to guarantee one self-contained file (no external data).
    proto = onnx.load(str(path))
    onnx.save_model(proto, str(path), save_as_external_data=False)


def check_onnx(path: Path, model: nn.Module, x_check: np.ndarray) -> None:
    """onnx.checker, allowed ops only, no external data, dynamic batch, onnxruntime == torch at batch 1 and 64."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = {node.op_type for node in proto.graph.node}
    if not ops <= ALLOWED_OPS:
        raise RuntimeError(f"{path.name}: ops outside the allowed set: {sorted(ops - ALLOWED_OPS)}")
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise RuntimeError(f"{path.name}: initializer {init.name} stored as external data")
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch_dim.dim_param:
        raise RuntimeError(f"{path.name}: batch dimension is not dynamic")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 64):
        xb = x_check[:n]
        got = sess.run(["logits"], {"x": xb})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(xb)).numpy()
        if got.shape != (n, 10) or not np.allclose(got, want, atol=1e-4, rtol=1e-4):
            raise RuntimeError(f"{path.name}: onnxruntime output differs from torch at batch {n}")


def ort_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the ONNX model under onnxruntime."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"x": x})[0]
    return float((logits.argmax(axis=1) == y).mean())


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="mnist_test.npz (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="assets folder (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="epochs for every network (default: per network)")
    p.add_argument("--only", default="A,B,C,D", help="comma-separated subset of A,B,C,D")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip().upper() for n in args.only.split(",") if n.strip()]
    for n in names:
        if n not in TRAIN_CONFIG:
            sys.exit(f"error: --only: unknown network {n!r}, expected a subset of A,B,C,D")
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)

    x_all, y_all = load_data(args.data)
    x_train = torch.from_numpy(to_input(x_all[slice(*TRAIN_RANGE)]))
    y_train = torch.from_numpy(y_all[slice(*TRAIN_RANGE)].astype(np.int64))
    x_held, y_held = to_input(x_all[slice(*HELDOUT_RANGE)]), y_all[slice(*HELDOUT_RANGE)].astype(np.int64)

    models_dir = args.out / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = models_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest.setdefault("models", {})
    command = "python " + " ".join(shlex.quote(a) for a in ["scripts/train_mnist.py", *sys.argv[1:]])

    for name in names:
        epochs, lr = TRAIN_CONFIG[name]
        epochs = args.epochs if args.epochs is not None else epochs
        seed = args.seed + "ABCD".index(name)  # one stream per network
        torch.manual_seed(seed)
        model = build_model(name)
        t0 = time.perf_counter()
        train(model, x_train, y_train, epochs, lr, seed)
        train_s = time.perf_counter() - t0
        path = models_dir / f"{name}.onnx"
        export_onnx(model, path)
        check_onnx(path, model, x_held[:64])
        acc = ort_accuracy(path, x_held, y_held)
        n_params = sum(p.numel() for p in model.parameters())
        manifest["models"][name] = {
            "file": path.name,
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
            "params": n_params,
            "heldout_2k_accuracy": round(acc, 4),
            "seed": seed,  # --seed plus the network's position in ABCD
            "epochs": epochs,
            "learning_rate": lr,
            "batch_size": BATCH_SIZE,
            "train_seconds": round(train_s, 1),
            "command": command,
        }
        print(
            f"{name}: {n_params} params, {epochs} epochs, {train_s:.1f}s training, accuracy on the held-out 2k "
            f"(MNIST test images 8000..9999, trained on 0..7999; onnxruntime) = {acc:.4f}",
            flush=True,
        )

    manifest["data"] = {
        "source": "MNIST official test set (mnist_test.npz)",
        "sha256": sha256_file(args.data),
        "train_images": f"{TRAIN_RANGE[0]}..{TRAIN_RANGE[1] - 1}",
        "heldout_images": f"{HELDOUT_RANGE[0]}..{HELDOUT_RANGE[1] - 1}",
        "slice_images": f"{HELDOUT_RANGE[0]}..{HELDOUT_RANGE[0] + SLICE_SIZE - 1} (mnist_slice.npz)",
        "note": "accuracies are on the held-out 2k (test images 8000..9999), not the standard MNIST split",
    }
    manifest["onnx"] = {
        "opset": OPSET,
        "input": "x float32 (N,1,28,28) = pixels/255",
        "output": "logits (N,10)",
    }
    manifest["versions"] = {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
    }
    manifest["models"] = dict(sorted(manifest["models"].items()))
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")

    lo = HELDOUT_RANGE[0]
    index = np.arange(lo, lo + SLICE_SIZE, dtype=np.int64)
    np.savez_compressed(
        args.out / "mnist_slice.npz", x=x_all[index], y=y_all[index].astype(np.uint8), index=index
    )
    print(f"wrote {manifest_path} and {args.out / 'mnist_slice.npz'} (images {lo}..{lo + SLICE_SIZE - 1})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
