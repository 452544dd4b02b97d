"""The shipped held-out set: all 2000 images (MNIST test 8000..9999) ship with veil, the networks'
recorded accuracy is reproduced on them, and the demo says how many images it used."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from veil.assets import HELDOUT, SLICE, load_heldout, load_slice, model_path
from veil.graph import load_model
from veil.plain import run_plain

ASSETS = Path(__file__).resolve().parents[1] / "src" / "veil" / "assets"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist_test.npz"


def test_heldout_is_2000_images_and_the_slice_is_its_start():
    x, y = load_heldout()
    assert x.shape == (HELDOUT, 1, 28, 28) and x.dtype == np.float32 and y.shape == (HELDOUT,)
    assert 0.0 <= x.min() and x.max() <= 1.0 and set(np.unique(y)) == set(range(10))
    with np.load(ASSETS / "mnist_heldout.npz") as f:
        np.testing.assert_array_equal(f["index"], np.arange(8000, 10000))
    with np.load(ASSETS / "mnist_slice.npz") as f:  # the older 256-image file: the same first images
        np.testing.assert_array_equal((x[:SLICE, 0] * 255).round().astype(np.uint8), f["x"])
    xs, ys = load_slice()
    assert len(xs) == SLICE and np.array_equal(ys, y[:SLICE])
    assert (ASSETS / "mnist_heldout.npz").stat().st_size < 400_000  # small: compressed uint8


def test_heldout_matches_the_shared_mnist_file():
    if not SHARED.is_file():
        pytest.skip(f"shared MNIST file not found at {SHARED} (kept beside the repository as ../shared)")
    with np.load(SHARED) as f:
        xa, ya = f["x_test"][8000:], f["y_test"][8000:]
    with np.load(ASSETS / "mnist_heldout.npz") as f:
        np.testing.assert_array_equal(f["x"], xa)
        np.testing.assert_array_equal(f["y"], ya)


def test_recorded_heldout_accuracy_is_reproduced_on_the_shipped_images():
    manifest = json.loads((ASSETS / "models" / "manifest.json").read_text())
    x, y = load_heldout()
    logits = run_plain(load_model(model_path("C")), x)["logits"]
    acc = float((logits.argmax(1) == y).mean())
    assert acc == pytest.approx(manifest["models"]["C"]["heldout_2k_accuracy"], abs=1 / HELDOUT)


def test_demo_names_the_images_it_used():
    r = subprocess.run([sys.executable, "-m", "veil.cli.main", "demo", "--plain", "--n", "2000"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "8000..9999" in r.stdout and "2000" in r.stdout and "99.30%" in r.stdout
