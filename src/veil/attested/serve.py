"""Start the attested server: platform, TLS identity, store, FastAPI app, uvicorn with TLS.

Steps at start:

1. open the platform (``platform_kind``, see :mod:`veil.attested.hardware.select`): SEV-SNP or TDX
   through Linux's configfs-tsm, or the simulation, which needs ``hazmat_allow_simulation`` and warns;
2. generate a fresh TLS key pair and self-signed certificate inside the trusted side;
3. open the store and unseal every model (a model that fails to unseal is reported and skipped);
4. hand the key to uvicorn through a file encrypted under a random in-memory password, which is
   deleted as soon as the TLS context is built;
5. bind ``host:port`` (port 0 picks a free one), write the ready file, serve until SIGINT/SIGTERM;
   on either, stop runs in progress, finish the answers under way, close the store, exit 0.

Secrets and the store: the store directory holds only sealed blobs and an index of HMACs. The
operator's upload credential and, on the simulated platform, its signing key and platform secret
live in a *state directory* outside the store (``--state-dir``; default
``$XDG_CONFIG_HOME/veil/attested/<hash of the store path>``, else ``~/.config/...``), directory
0700 and files 0600. A store that still holds such files (older layout), or a state directory,
token file or platform directory inside the store, is refused at start. On a hardware platform
the sealing keys are derived by the platform and never written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn

from veil.attested.hardware.configfs_tsm import DEFAULT_TSM_ROOT, ConfigfsTsm, ConfigfsTsmPlatform
from veil.attested.hardware.select import choose_platform
from veil.attested.limits import Limits
from veil.attested.onnx_model import cap_run_memory
from veil.attested.platform import SimulationWarning, TrustedPlatform
from veil.attested.server import ServerState, create_app
from veil.attested.simulated import SimulatedPlatform
from veil.attested.store import ModelStore
from veil.attested.tlskeys import generate_tls_identity
from veil.attested.trusted import TrustedSide
from veil.errors import DeploymentError

__all__ = ["serve", "read_or_create_upload_token", "default_state_dir"]


def default_state_dir(store_dir: str | os.PathLike[str]) -> Path:
    """Where the server keeps its secrets for ``store_dir`` unless ``--state-dir`` says otherwise:
    ``$XDG_CONFIG_HOME/veil/attested/<first 16 hex of SHA-256 of the store's absolute path>``."""
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    key = hashlib.sha256(str(Path(store_dir).resolve()).encode()).hexdigest()[:16]
    return base / "veil" / "attested" / key


def _inside(path: Path, directory: Path) -> bool:
    p, d = path.resolve(), directory.resolve()
    return p == d or d in p.parents


def _private_dir(path: Path, what: str = "the state directory") -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)
    except OSError as e:
        raise DeploymentError(f"cannot use {path} as {what}: {e.strerror or e}; expected a directory "
                              "this user can create or write") from None
    return path


class _Server(uvicorn.Server):
    """uvicorn, except that SIGINT/SIGTERM end :meth:`run` normally (uvicorn re-raises the signal after
    its graceful shutdown, which would kill the process before the store is closed) and first ask
    onnxruntime to stop the runs in progress."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def read_or_create_upload_token(path: Path) -> str:
    """The operator's upload credential in ``path`` (created, 0600, if absent)."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("veil_upl_" + secrets.token_urlsafe(32) + "\n")
    token = path.read_text().strip()
    if len(token) < 16:
        raise DeploymentError(f"upload credential in {path} is shorter than 16 characters")
    return token


def serve(store_dir: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 8443, *,
          hazmat_allow_simulation: bool = False, limits: Limits | None = None,
          upload_token_file: str | os.PathLike[str] | None = None,
          platform_dir: str | os.PathLike[str] | None = None, intra_op_threads: int = 1,
          ready_file: str | os.PathLike[str] | None = None, log_level: str = "warning",
          state_dir: str | os.PathLike[str] | None = None, platform_kind: str = "auto",
          tsm_root: str | os.PathLike[str] | None = None, ephemeral_sealing: bool = False) -> None:
    tsm = ConfigfsTsm(tsm_root if tsm_root is not None else DEFAULT_TSM_ROOT)
    kind = choose_platform(platform_kind, hazmat_allow_simulation=hazmat_allow_simulation, tsm=tsm)
    store_path = Path(store_dir)
    try:
        store_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise DeploymentError(f"cannot use {store_path} as the model store: {e.strerror or e}; expected a "
                              "directory (created if absent)") from None
    state_path = Path(state_dir) if state_dir is not None else default_state_dir(store_path)
    token_path = Path(upload_token_file) if upload_token_file else state_path / "upload.token"
    platform_path = Path(platform_dir) if platform_dir is not None else state_path / "simulated-platform"
    for what, path in (("the state directory", state_path), ("the upload token file", token_path),
                       ("the simulated platform directory", platform_path)):
        if _inside(path, store_path):
            raise DeploymentError(f"{what} ({path}) is inside the store {store_path}; models could be made to read "
                                  "it: keep secrets outside the store")
    legacy = [n for n in ("upload.token", "simulated-platform") if (store_path / n).exists()]
    if legacy:
        raise DeploymentError(f"the store {store_path} holds secrets in clear ({', '.join(legacy)}; older layout): "
                              f"move them into the state directory {state_path} (or pass --state-dir) and restart")
    _private_dir(state_path)
    platform: TrustedPlatform
    if kind == "simulated":
        with warnings.catch_warnings():  # said once, on the next line, without Python's source-line dump
            warnings.simplefilter("ignore", SimulationWarning)
            platform = SimulatedPlatform(platform_path)
        print("WARNING: veil attested runs a SIMULATED enclave: evidence is signed by a simulation key and proves "
              "nothing about the hardware.", file=sys.stderr, flush=True)
    else:
        platform = ConfigfsTsmPlatform(tsm, expect=kind, ephemeral_sealing=ephemeral_sealing)
    signer = platform.public_key_hex if isinstance(platform, SimulatedPlatform) else None
    tls = generate_tls_identity(tuple(dict.fromkeys((host, "127.0.0.1", "localhost"))))
    trusted = TrustedSide(platform, tls)
    store = ModelStore(store_path, platform)
    token = read_or_create_upload_token(token_path)
    limits = limits or Limits()
    cap_run_memory(limits.max_run_memory_bytes)  # before any session is built
    state = ServerState(trusted, store, limits, token, intra_op_threads)
    for model_id, why in state.unavailable.items():
        print(f"WARNING: model {model_id!r} could not be restored: {why}", file=sys.stderr, flush=True)
    app = create_app(state)

    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP, and
    # without it every response (headers and body are separate TLS records) waits ~40 ms for a delayed ACK
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:  # OverflowError: a port outside 0..65535
        sock.close()
        raise DeploymentError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    actual_port = sock.getsockname()[1]

    password = secrets.token_hex(32)
    with tempfile.TemporaryDirectory(prefix="veil-tls-") as tmp:
        key_file, cert_file = Path(tmp) / "key.pem", Path(tmp) / "cert.pem"
        key_file.write_bytes(tls.encrypted_key_pem(password.encode()))
        cert_file.write_bytes(tls.cert_pem)
        config = uvicorn.Config(app, ssl_keyfile=str(key_file), ssl_certfile=str(cert_file),
                                ssl_keyfile_password=password, log_level=log_level, access_log=False,
                                timeout_keep_alive=30, server_header=False, timeout_graceful_shutdown=15)
        config.load()  # builds the SSL context; the key files are deleted right after
    info = {"url": f"https://{host}:{actual_port}", "port": actual_port, "pid": os.getpid(),
            "platform": platform.name, "measurement": trusted.measurement,
            "simulation_signer": signer, "tls_spki_sha256": tls.spki_sha256,
            "state_dir": str(state_path), "upload_token_file": str(token_path), "models": len(state.models)}
    if ready_file is not None:
        tmp_ready = Path(str(ready_file) + ".tmp")
        tmp_ready.write_text(json.dumps(info))
        os.replace(tmp_ready, ready_file)
    print(f"veil attested: serving {info['url']} (platform {platform.name}, code {trusted.measurement[:16]}..., "
          f"{len(state.models)} models; secrets in {state_path})", flush=True)
    if signer is not None:
        print(f"veil attested: simulation signer to pin in clients: {signer}", flush=True)
    try:
        _Server(config, state.stop_runs).run(sockets=[sock])
    finally:
        state.stop_runs()
        store.close()
        sock.close()
    print("veil attested: stopped, store closed", flush=True)
