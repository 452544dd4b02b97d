"""The cloud's role: run the transformed model on permuted inputs; keep decoder KV caches.

The cloud holds only the transformed weights (``veil-permute-cloud/1``). In ``embed`` mode it gets
permuted hidden states ``x pi`` (the user embedded the tokens) and returns the permuted final hidden
states; in ``vocab`` mode it gets permuted token ids and returns logits in permuted vocabulary order
(decoders) or permuted final hidden states (encoders).

Sessions idle for longer than ``session_ttl_s`` are dropped when a new one is opened.

Generation: a session keeps one sequence's key/value cache on the cloud, so each generated token
costs one round trip carrying one position. ``step_batch`` runs the pending steps of several
sessions as one batch: caches of different lengths are left-padded with zeros and masked out, and
each row gets its own ``position_ids``; afterwards each session keeps its own unpadded slice.

The runtime is not thread-safe; the HTTP server calls it from one worker thread.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from veil.errors import InputError, InputShapeError
from veil.permute.bundle import CloudPackage
from veil.permute.errors import CloudError, SequenceTooLongError
from veil.permute.families import adapter_for
from veil.permute.models import build_module, config_from_dict

__all__ = ["CloudRuntime", "Session"]


@dataclass
class Session:
    """One decoder sequence: its cache, one ``(keys, values)`` pair per layer, and its length."""

    length: int = 0
    cache: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)


class CloudRuntime:
    """Transformed model + sessions. Inputs are NumPy arrays already decoded from the wire."""

    def __init__(self, package: CloudPackage, max_sessions: int = 256, session_ttl_s: float = 600.0):
        self.config = config_from_dict(package.config)
        self.adapter = adapter_for(self.config)
        self.meta = dict(package.meta)
        self.mode = str(self.meta.get("mode"))
        if self.mode not in ("embed", "vocab") or self.meta.get("family") != self.adapter.family:
            raise CloudError(f"cloud package metadata (mode {self.mode!r}, family {self.meta.get('family')!r}) "
                             f"does not match its config (family {self.adapter.family!r})")
        self.module = build_module(self.adapter, self.config, package.state_dict, base_only=self.mode == "embed")
        self.hidden_size = self.adapter.hidden_size(self.config)
        self.vocab_size = self.adapter.vocab_size(self.config)
        self.max_positions = self.adapter.max_positions(self.config)
        self.max_sessions, self.session_ttl_s = max_sessions, session_ttl_s
        self.sessions: dict[str, Session] = {}

    # --- public facts ---------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        keys = ("family", "mode", "key_id", "hidden_size", "vocab_size", "max_positions", "is_decoder")
        return {k: self.meta.get(k) for k in keys}

    # --- input checks ---------------------------------------------------------------------------
    def check_input(self, x: np.ndarray, past: int = 0, batched: bool = True) -> None:
        """Raise a typed error if ``x`` is not what this cloud accepts (never a wrong answer)."""
        lead = 2 if batched else 1
        if self.mode == "embed":
            if x.dtype != np.float32 or x.ndim != lead + 1 or x.shape[-1] != self.hidden_size:
                expected = (None,) * lead + (self.hidden_size,)
                raise InputShapeError("hidden_states", x.shape, expected) if x.dtype == np.float32 else \
                    InputError(f"hidden states have dtype {x.dtype}; expected float32")
            if not np.isfinite(x).all():
                raise InputError("hidden states contain NaN or infinity")
        else:
            if x.dtype != np.int64 or x.ndim != lead:
                raise InputError(f"token ids have dtype {x.dtype} and {x.ndim} axes; expected int64 with {lead}")
            if x.size and (x.min() < 0 or x.max() >= self.vocab_size):
                raise InputError(f"token ids must lie in 0..{self.vocab_size - 1}")
        length = x.shape[-2] if self.mode == "embed" else x.shape[-1]
        if length == 0:
            raise InputError("a request must carry at least one position")
        if past + length > self.max_positions:
            raise SequenceTooLongError(past + length, self.max_positions)

    def _call(self, x: np.ndarray, **kwargs):
        t = torch.from_numpy(x)
        with torch.inference_mode():
            if self.mode == "embed":
                return self.module(inputs_embeds=t, **kwargs)
            return self.module(input_ids=t, **kwargs)

    def _output(self, out) -> torch.Tensor:
        return out.logits if (self.mode == "vocab" and self.adapter.is_decoder) else out.last_hidden_state

    # --- whole sequences ------------------------------------------------------------------------
    def forward(self, x: np.ndarray, attention_mask: np.ndarray | None = None,
                token_type_ids: np.ndarray | None = None) -> np.ndarray:
        """All positions of a batch of whole sequences (encoders; decoders without a cache).
        ``token_type_ids``: segment ids of sentence pairs (encoders with token-type embeddings)."""
        self.check_input(x)
        kwargs: dict[str, Any] = {"use_cache": False} if self.adapter.is_decoder else {}
        if attention_mask is not None:
            if attention_mask.shape != x.shape[:2]:
                raise InputShapeError("attention_mask", attention_mask.shape, x.shape[:2])
            kwargs["attention_mask"] = torch.from_numpy(attention_mask.astype(np.int64))
        if token_type_ids is not None:
            types = int(getattr(self.config, "type_vocab_size", 0) or 0)
            if self.adapter.is_decoder or types < 1:
                raise InputError(f"{self.adapter.family} takes no token_type_ids (no token-type embeddings)")
            if token_type_ids.shape != x.shape[:2]:
                raise InputShapeError("token_type_ids", token_type_ids.shape, x.shape[:2])
            if token_type_ids.dtype.kind not in "iu" or token_type_ids.min() < 0 or token_type_ids.max() >= types:
                raise InputError(f"token_type_ids must be integers in 0..{types - 1}")
            kwargs["token_type_ids"] = torch.from_numpy(token_type_ids.astype(np.int64))
        return self._output(self._call(x, **kwargs)).float().numpy()

    # --- sessions -------------------------------------------------------------------------------
    def open_session(self) -> str:
        if not self.adapter.is_decoder:
            raise CloudError(f"{self.adapter.family} is an encoder: sessions are for decoder models only")
        now = time.monotonic()
        for stale in [k for k, v in self.sessions.items() if now - v.last_used > self.session_ttl_s]:
            del self.sessions[stale]  # a user that vanished does not hold memory forever
        if len(self.sessions) >= self.max_sessions:
            raise CloudError(f"too many open sessions ({self.max_sessions}); close one first")
        sid = secrets.token_hex(16)
        self.sessions[sid] = Session()
        return sid

    def close_session(self, sid: str) -> None:
        if self.sessions.pop(sid, None) is None:
            raise CloudError("unknown session")

    def session(self, sid: str) -> Session:
        try:
            return self.sessions[sid]
        except KeyError:
            raise CloudError("unknown session") from None

    def step_batch(self, items: list[tuple[str, np.ndarray]]) -> list[np.ndarray | Exception]:
        """Append positions to several sessions; return each one's output at its last position.

        ``items``: (session id, input for one sequence: (t, d) floats or (t,) ids). Invalid items get
        their exception in the result list; the others run, batched by their number of positions."""
        results: list[np.ndarray | Exception | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        seen: set[str] = set()
        for i, (sid, x) in enumerate(items):
            try:
                sess = self.session(sid)
                if sid in seen:
                    raise CloudError("two steps of one session in one batch")
                self.check_input(x, past=sess.length, batched=False)
            except Exception as exc:  # returned to that request only
                results[i] = exc
                continue
            seen.add(sid)
            t = x.shape[0]
            groups.setdefault(t, []).append(i)
        for _, idx in sorted(groups.items()):
            outs = self._run_group([items[i][0] for i in idx], [items[i][1] for i in idx])
            for i, o in zip(idx, outs, strict=True):
                results[i] = o
        return results  # type: ignore[return-value]

    def _run_group(self, sids: list[str], xs: list[np.ndarray]) -> list[np.ndarray]:
        from transformers import DynamicCache

        sessions = [self.sessions[s] for s in sids]
        t = xs[0].shape[0]
        past = max(s.length for s in sessions)
        n = len(sessions)
        mask = torch.ones(n, past + t, dtype=torch.long)
        pos = torch.empty(n, t, dtype=torch.long)
        for i, s in enumerate(sessions):
            mask[i, : past - s.length] = 0
            pos[i] = torch.arange(s.length, s.length + t)
        if past:
            ref = next(s for s in sessions if s.cache)
            layers = []
            for layer, (rk, rv) in enumerate(ref.cache):
                ks = [self._left_pad(s, layer, 0, past, rk) for s in sessions]
                vs = [self._left_pad(s, layer, 1, past, rv) for s in sessions]
                layers.append((torch.cat(ks), torch.cat(vs)))
            cache = DynamicCache(ddp_cache_data=layers, config=self.config)
        else:
            cache = DynamicCache(config=self.config)
        extra = {"logits_to_keep": 1} if self.mode == "vocab" else {}
        out = self._call(np.stack(xs), attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                         **extra)
        result = self._output(out)[:, -1].float().numpy()
        new = out.past_key_values
        for i, s in enumerate(sessions):
            start = past - s.length
            if n == 1:
                s.cache = [(lay.keys, lay.values) for lay in new.layers]
            else:
                s.cache = [(lay.keys[i:i + 1, :, start:].clone(), lay.values[i:i + 1, :, start:].clone())
                           for lay in new.layers]
            s.length += t
            s.last_used = time.monotonic()
        return [result[i] for i in range(n)]

    @staticmethod
    def _left_pad(s: Session, layer: int, which: int, past: int, ref: torch.Tensor) -> torch.Tensor:
        """This session's cached keys (which=0) or values (1), left-padded with zeros to ``past``."""
        if s.length == past:
            return s.cache[layer][which]
        pad = torch.zeros(1, ref.shape[1], past - s.length, ref.shape[3], dtype=ref.dtype)
        if s.length == 0:
            return pad
        return torch.cat([pad, s.cache[layer][which]], dim=2)
