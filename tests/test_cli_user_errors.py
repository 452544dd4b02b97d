"""Bad input a new user meets, through the real command line: one line ``error: ...``, exit code 2, no traceback.

Each case was a traceback or a foreign exit code before (found trying veil as a new user would).
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from veil.errors import DeploymentError
from veil.net.ports import check_can_listen


def veil_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "veil.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_error_line(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr
    for w in words:
        assert w in errors[0], errors[0]


@pytest.fixture
def busy_port():
    """A port some other program is listening on (loopback)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def test_check_can_listen_names_the_port(busy_port):
    with pytest.raises(DeploymentError, match=f"127.0.0.1:{busy_port}.*in use"):
        check_can_listen("127.0.0.1", busy_port)
    with pytest.raises(DeploymentError, match="out of range"):
        check_can_listen("127.0.0.1", 70000)
    check_can_listen("127.0.0.1", 0)  # any free port: no error


def test_permute_serve_port_in_use(tmp_path, busy_port):
    # checked before the cloud package is read, so a missing package does not hide it
    r = veil_cli("permute", "serve", "--cloud", str(tmp_path / "cloud"), "--port", str(busy_port))
    assert_one_error_line(r, f"127.0.0.1:{busy_port}", "in use")


def test_permute_generate_prompt_ids_not_numbers(tmp_path):
    r = veil_cli("permute", "generate", "--user", str(tmp_path / "user"), "--prompt-ids", "a b",
                 "--url", "http://127.0.0.1:1")
    assert_one_error_line(r, "--prompt-ids", "'a b'")


def test_attested_serve_store_is_a_file(tmp_path):
    store = tmp_path / "model.onnx"
    store.write_bytes(b"not a directory")
    r = veil_cli("attested", "serve", "--store", str(store), "--port", "0", "--hazmat-allow-simulation",
                 "--state-dir", str(tmp_path / "state"))
    assert_one_error_line(r, str(store), "model store")


def test_attested_serve_state_dir_is_a_file(tmp_path):
    state = tmp_path / "state"
    state.write_text("x")
    r = veil_cli("attested", "serve", "--store", str(tmp_path / "store"), "--port", "0",
                 "--hazmat-allow-simulation", "--state-dir", str(state))
    assert_one_error_line(r, str(state), "state directory")


def test_error_text_is_not_read_as_markup(tmp_path):
    # rich markup in a message (here a path) used to vanish ("[1]") or crash the printer ("[/x]": a traceback)
    r = veil_cli("inspect", str(tmp_path / "m[/x][1].onnx"))
    assert_one_error_line(r, "m[/x][1].onnx")


def test_permute_error_is_one_unwrapped_line(tmp_path):
    # longer than the 80 columns rich assumes without a terminal: still one line
    r = veil_cli("permute", "generate", "--user", str(tmp_path / ("u" * 100)), "--url", "http://127.0.0.1:1")
    assert_one_error_line(r, "u" * 100, "no such directory")


def test_every_visible_option_has_help():
    from typer.main import get_command

    from veil.cli.main import app

    missing: list[str] = []

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
            return
        if not cmd.help:
            missing.append(" ".join(path))
        for p in cmd.params:
            if p.param_type_name == "option" and not p.hidden and not p.help and "--help" not in p.opts:
                missing.append(f"{' '.join(path)} {p.opts[0]}")

    walk(get_command(app), ["veil"])
    assert not missing, missing


def test_attested_serve_says_simulated_once_without_python_warning_dump(tmp_path, busy_port):
    # stops at the busy port, after the platform is chosen and announced
    r = veil_cli("attested", "serve", "--store", str(tmp_path / "store"), "--port", str(busy_port),
                 "--hazmat-allow-simulation", "--state-dir", str(tmp_path / "state"))
    assert_one_error_line(r, f"127.0.0.1:{busy_port}")
    assert r.stderr.count("SIMULATED") == 1, r.stderr
    assert "SimulationWarning" not in r.stderr and ".py:" not in r.stderr, r.stderr


def test_party_of_a_mode_without_roles_names_the_modes_that_have_them(tmp_path):
    from veil.net import write_deployment

    dep = write_deployment(tmp_path / "d.toml", "d", "permute", {"cloud": "127.0.0.1:1", "user": "127.0.0.1:2"})
    r = veil_cli("party", "-d", str(dep.path), "--as", "cloud")
    assert_one_error_line(r, "'permute' has no party roles", "modes with party roles: mpc, offload")


def _children(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(c) for c in f.read().split()}
    except OSError:
        return set()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc (Linux)")
def test_sigterm_stops_the_party_processes_a_command_started():
    """`timeout`/`kill` on `veil demo` used to leave its five party processes running (orphaned)."""
    import os
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "veil.cli.main", "demo", "--n", "2000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parties: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while len(parties) < 5 and time.monotonic() < deadline and proc.poll() is None:
            parties = _children(proc.pid)
            time.sleep(0.1)
        assert len(parties) == 5, "the demo did not start its five parties"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in parties) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in parties if _alive(p)], "party processes left running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for p in parties:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_inspect_and_run_take_a_shipped_network_name(tmp_path):
    import numpy as np

    from veil.assets import load_slice

    r = veil_cli("inspect", "C")
    assert r.returncode == 0 and "431,080 parameters" in r.stdout, r.stderr
    x, y = load_slice(4)
    np.save(tmp_path / "x.npy", x)
    r = veil_cli("run", "c", str(tmp_path / "x.npy"))
    assert r.returncode == 0 and f"argmax {y.tolist()}" in r.stdout, (r.stdout, r.stderr)


def test_keys_refuses_to_replace_an_existing_ca_without_force(tmp_path):
    dep = tmp_path / "dep.toml"
    dep.write_text('name = "t"\nmode = "mpc"\n[parties]\nalice = "127.0.0.1:7001"\nbob = "127.0.0.1:7002"\n')
    assert veil_cli("keys", "-d", str(dep)).returncode == 0
    ca = (tmp_path / "keys" / "ca" / "ca.pem").read_bytes()
    alice = (tmp_path / "keys" / "alice" / "alice.key").read_bytes()
    r = veil_cli("keys", "-d", str(dep))
    assert_one_error_line(r, "already exists", "--force")
    assert (tmp_path / "keys" / "ca" / "ca.pem").read_bytes() == ca  # nothing replaced
    assert (tmp_path / "keys" / "alice" / "alice.key").read_bytes() == alice
    assert veil_cli("keys", "-d", str(dep), "--force").returncode == 0
    assert (tmp_path / "keys" / "ca" / "ca.pem").read_bytes() != ca


def test_old_simulation_flags_are_hidden_and_still_accepted(tmp_path, busy_port):
    from typer.main import get_command

    from veil.cli.main import app

    root = get_command(app)
    for group, name, old in (("offload", "train", "--hazmat-simulate"), ("attested", "serve", "--hazmat-simulate-enclave")):
        params = {o: p for p in root.commands[group].commands[name].params for o in p.opts}  # type: ignore[attr-defined]
        assert params[old].hidden and not params["--hazmat-allow-simulation"].hidden, (group, name)
        assert old not in params["--hazmat-allow-simulation"].opts
    # accepted: the server gets past the simulation refusal and stops at the busy port
    r = veil_cli("attested", "serve", "--store", str(tmp_path / "store"), "--port", str(busy_port),
                 "--hazmat-simulate-enclave", "--state-dir", str(tmp_path / "state"))
    assert_one_error_line(r, "cannot listen")
    r = veil_cli("offload", "train", "B", "--hazmat-simulate", "--optimizer", "nope", timeout=120)
    assert_one_error_line(r, "unknown optimizer 'nope'")


def test_plain_demo_checks_batch_size_as_the_secure_demo_does():
    r = veil_cli("demo", "--plain", "--n", "8", "--batch-size", "0")
    assert_one_error_line(r, "batch_size must be a whole number >= 1", "got 0")


def test_attested_serve_port_out_of_range(tmp_path):
    r = veil_cli("attested", "serve", "--store", str(tmp_path / "store"), "--port", "70000",
                 "--hazmat-allow-simulation", "--state-dir", str(tmp_path / "state"))
    assert_one_error_line(r, "cannot listen on 127.0.0.1:70000", "0-65535")


def test_mpc_local_refuses_a_wrong_shape_before_starting_parties(tmp_path):
    import time

    import numpy as np

    np.save(tmp_path / "bad.npy", np.zeros((2, 3), np.float32))
    t0 = time.perf_counter()
    r = veil_cli("mpc", "local", "A", "--inputs", str(tmp_path / "bad.npy"))
    assert_one_error_line(r, "(2, 3)")
    assert "deployment failed" not in r.stderr and time.perf_counter() - t0 < 60  # refused before any party ran


def test_out_in_a_missing_folder_is_one_error_line(tmp_path):
    import numpy as np

    from veil.assets import load_slice

    np.save(tmp_path / "x.npy", load_slice(2)[0])
    missing = tmp_path / "no" / "such" / "o.npz"
    r = veil_cli("run", "D", str(tmp_path / "x.npy"), "--out", str(missing))  # checked before running
    assert_one_error_line(r, "--out", "does not exist")
    r = veil_cli("mpc", "run", "D", "--n", "2", "--out", str(missing))  # any OSError a command lets through
    assert_one_error_line(r, "No such file or directory", str(missing))


def test_mpc_run_unknown_model_names_what_is_accepted():
    r = veil_cli("mpc", "run", "Z")
    assert_one_error_line(r, "'Z'", "ONNX file", "A, B, C, D")
