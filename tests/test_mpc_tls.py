"""mpc over real processes and mutual TLS on loopback (one small model, short): a correct run, and a
party presenting a certificate from another CA, which must stop every process with an error."""

import shutil
import time

import numpy as np
import pytest

from veil.assets import load_slice, model_path
from veil.errors import VeilError
from veil.graph import load_model
from veil.mpc.demo import run_local_deployment
from veil.net.keys import create_ca, issue_party_cert
from veil.plain import run_plain


def test_five_processes_over_tls_agree_with_plain(tmp_path):
    x, _ = load_slice(4)
    res = run_local_deployment(model_path("A"), x, tmp_path, batch_size=2, timeout=120, recv_timeout=30)
    ref = run_plain(load_model(model_path("A")), x)["logits"]
    got = res["outputs"]["logits"]
    assert np.array_equal(got.argmax(1), ref.argmax(1)) and np.abs(got - ref).max() < 5e-3
    rep = res["report"]
    assert rep["queries"] == 2 and rep["rounds"] == rep["declared_rounds"]
    assert rep["server_bytes"] == rep["declared_server_bytes"]  # same counters over TLS as in memory


def test_wrong_certificate_stops_every_party(tmp_path):
    rogue = tmp_path / "rogue"
    rogue.mkdir()

    def tamper(keys_dir):
        key, cert = create_ca(rogue, "rogue")
        issue_party_cert(rogue, "server1", key, cert)
        for suffix in (".pem", ".key"):
            shutil.copy(rogue / f"server1{suffix}", keys_dir / f"server1{suffix}")

    work = tmp_path / "run"
    work.mkdir()
    x, _ = load_slice(1)
    t0 = time.perf_counter()
    with pytest.raises(VeilError, match="server1") as exc:
        run_local_deployment(model_path("A"), x, work, timeout=60, recv_timeout=5, tamper=tamper)
    assert time.perf_counter() - t0 < 60
    msg = str(exc.value)
    assert all(p in msg for p in ("owner", "user", "server0", "server1", "dealer"))  # every party failed
