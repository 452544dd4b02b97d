"""Deployment files: which parties exist, where they listen, which mode they run.

A deployment is a small TOML file::

    name = "demo"
    mode = "mpc"            # the mode whose party roles `veil party` runs
    timeout = 30            # seconds every receive may wait
    keys = "keys"           # key directory, relative to this file (see `veil keys`)

    [parties]
    server0 = "127.0.0.1:7101"
    server1 = "127.0.0.1:7102"

    [options]               # mode-specific settings, passed through untouched
    model = "C"
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veil.errors import DeploymentError

__all__ = ["Party", "Deployment", "load_deployment", "write_deployment"]

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class Party:
    name: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class Deployment:
    name: str
    mode: str
    parties: dict[str, Party]
    timeout: float = 30.0
    keys_dir: Path = Path("keys")
    options: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def party(self, name: str) -> Party:
        if name not in self.parties:
            raise DeploymentError(f"deployment {self.name!r} has no party {name!r}; parties are {sorted(self.parties)}")
        return self.parties[name]


def _parse_address(name: str, addr: Any) -> Party:
    if not isinstance(addr, str) or addr.count(":") != 1:
        raise DeploymentError(f"party {name!r}: address must be a 'host:port' string, got {addr!r}")
    host, port_s = addr.rsplit(":", 1)
    try:
        port = int(port_s)
    except ValueError:
        raise DeploymentError(f"party {name!r}: port {port_s!r} is not a number") from None
    if not (0 < port < 65536) or not host:
        raise DeploymentError(f"party {name!r}: expected host:port with a port in 1..65535, got {addr!r}")
    return Party(name, host, port)


def load_deployment(path: str | Path) -> Deployment:
    """Read and validate a deployment TOML file."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise DeploymentError(f"deployment file {str(p)!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise DeploymentError(f"deployment file {str(p)!r} is not valid TOML: {e}") from None
    for key in ("name", "mode", "parties"):
        if key not in data:
            raise DeploymentError(f"deployment file {str(p)!r}: missing required key {key!r}")
    parties_raw = data["parties"]
    if not isinstance(parties_raw, dict) or len(parties_raw) < 2:
        raise DeploymentError(f"deployment file {str(p)!r}: [parties] must name at least two parties")
    parties = {}
    for name, addr in parties_raw.items():
        if not _NAME.match(name):
            raise DeploymentError(f"party name {name!r}: use lowercase letters, digits, '-' or '_' (max 32)")
        parties[name] = _parse_address(name, addr)
    keys = Path(data.get("keys", "keys"))
    if not keys.is_absolute():
        keys = p.parent / keys
    timeout = data.get("timeout", 30.0)
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise DeploymentError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return Deployment(str(data["name"]), str(data["mode"]), parties, float(timeout), keys,
                      dict(data.get("options", {})), p)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise DeploymentError(f"cannot write option value of type {type(v).__name__} to TOML")


def write_deployment(path: str | Path, name: str, mode: str, parties: dict[str, str], timeout: float = 30.0,
                     keys: str = "keys", options: dict[str, Any] | None = None) -> Deployment:
    """Write a deployment file (e.g. for local demos) and return it parsed."""
    lines = [f"name = {_toml_value(name)}", f"mode = {_toml_value(mode)}", f"timeout = {timeout!r}",
             f"keys = {_toml_value(keys)}", "", "[parties]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in parties.items()]
    if options:
        lines += ["", "[options]"] + [f"{k} = {_toml_value(v)}" for k, v in options.items()]
    Path(path).write_text("\n".join(lines) + "\n")
    return load_deployment(path)
