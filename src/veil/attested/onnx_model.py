"""A model the server can serve: ONNX bytes checked, an onnxruntime session, and input validation.

Upload-time checks (a refusal names the reason): the bytes parse as ONNX; no tensor anywhere in
the model refers to external data (which onnxruntime would read from the server's disk); onnxruntime
accepts the graph; every input has a supported dtype. Run-time checks: input names, dtypes, ranks and
fixed dimensions match the model's declaration before onnxruntime sees them.

External data is closed twice:

1. :func:`external_data_tensors` walks *every* message of the model protobuf (graph initializers,
   sparse initializers, node attributes of every kind, nested If/Loop/Scan graphs, ``model.functions``,
   training info): any ``TensorProto`` with ``data_location = EXTERNAL`` or ``external_data`` entries
   refuses the model;
2. sessions are built from bytes (no model path) with onnxruntime's external-initializer folder set
   to a fresh empty directory, so a reference that slipped past (1) resolves to no file: onnxruntime
   refuses paths that escape that folder and finds nothing inside it.

Run-time limits (:meth:`ServedModel.run`): a run past ``max_seconds`` is stopped by onnxruntime
(``RunOptions.terminate`` set from a timer; checked between kernels, including every Loop
iteration), and outputs larger than ``max_output_bytes`` in total are refused before they are
encoded for the answer. With :func:`cap_run_memory`, every session allocates its run-time tensors
(outputs included) from one process-wide onnxruntime CPU arena capped at that many bytes, so a
tensor that would exceed it is refused *before* it is allocated (initializers are not counted).
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from veil.attested.tensors import INPUT_DTYPES, ORT_TYPE_TO_DTYPE

__all__ = ["ModelRejected", "InputRejected", "RunLimitExceeded", "TensorDecl", "ServedModel", "load_served_model",
           "external_data_tensors", "build_session", "cap_run_memory"]

_run_memory: int | None = None  # bytes of the shared onnxruntime arena, once registered


def cap_run_memory(max_bytes: int) -> None:
    """Register onnxruntime's process-wide CPU arena, capped at ``max_bytes``, for every session built
    afterwards: the memory of all runs in progress together stays below it (a run that would pass it
    fails with ``run_memory_exceeded``). Once per process; call before building sessions."""
    global _run_memory
    if _run_memory is not None:
        if _run_memory != max_bytes:
            raise ValueError(f"the run memory cap is already {_run_memory} bytes in this process")
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(max_bytes, -1, -1, -1))
    _run_memory = max_bytes


class ModelRejected(ValueError):
    """The bytes are not a model the server can serve (message is safe to return)."""


class InputRejected(ValueError):
    """Inputs do not match the model (message is safe to return)."""


class RunLimitExceeded(ValueError):
    """A run went past a limit (time or output size); ``code`` names it (message is safe to return)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TensorDecl:
    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype,
                "shape": [d if isinstance(d, int) else None for d in self.shape]}


def external_data_tensors(model: onnx.ModelProto) -> Iterator[str]:
    """Names of every ``TensorProto`` anywhere in ``model`` that refers to external data.

    Walks all messages of the protobuf (iteratively, so nesting depth does not matter): graph
    initializers, ``sparse_initializer`` values and indices, node attributes (``t``, ``tensors``,
    ``sparse_tensor``, ``sparse_tensors``, ``g``, ``graphs``) at any depth, ``model.functions``
    bodies and attribute defaults, training info."""
    stack: list[Any] = [model]
    while stack:
        msg = stack.pop()
        if isinstance(msg, onnx.TensorProto):
            if msg.data_location == onnx.TensorProto.EXTERNAL or len(msg.external_data) > 0:
                yield msg.name or "<unnamed>"
            continue
        for fd, value in msg.ListFields():
            if fd.type != fd.TYPE_MESSAGE:
                continue
            if fd.is_repeated:
                stack.extend(value)
            else:
                stack.append(value)


def _short(msg: str) -> str:
    line = str(msg).strip().splitlines()[0] if str(msg).strip() else "unknown error"
    return line[:300]


class ServedModel:
    def __init__(self, sha256: str, session: ort.InferenceSession):
        self.sha256 = sha256
        self.session = session
        self._active: set[ort.RunOptions] = set()
        self._active_lock = threading.Lock()
        self.inputs = [TensorDecl(i.name, ORT_TYPE_TO_DTYPE.get(i.type, i.type), tuple(i.shape))
                       for i in session.get_inputs()]
        self.outputs = [TensorDecl(o.name, ORT_TYPE_TO_DTYPE.get(o.type, o.type), tuple(o.shape))
                        for o in session.get_outputs()]

    def check_inputs(self, feeds: dict[str, np.ndarray]) -> None:
        declared = {d.name: d for d in self.inputs}
        missing = [n for n in declared if n not in feeds]
        unknown = [n for n in feeds if n not in declared]
        if missing or unknown:
            raise InputRejected(f"inputs do not match the model: missing {missing}, unknown {unknown}; "
                                f"the model takes {list(declared)}")
        for name, arr in feeds.items():
            d = declared[name]
            if arr.dtype.name != d.dtype:
                raise InputRejected(f"input {name!r} has dtype {arr.dtype.name}, but the model expects {d.dtype}")
            if arr.ndim != len(d.shape) or any(isinstance(e, int) and e != g for e, g in zip(d.shape, arr.shape,
                                                                                            strict=True)):
                exp = "(" + ", ".join(str(e) if isinstance(e, int) else "?" for e in d.shape) + ")"
                raise InputRejected(f"input {name!r} has shape {tuple(arr.shape)}, but the model expects {exp}")

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None, *,
            max_seconds: float | None = None, max_output_bytes: int | None = None) -> dict[str, np.ndarray]:
        """Run on checked inputs. Past ``max_seconds`` onnxruntime stops the run
        (:class:`RunLimitExceeded` ``run_time_exceeded``); outputs above ``max_output_bytes`` in
        total are refused (``output_too_large``)."""
        self.check_inputs(feeds)
        names = output_names or [o.name for o in self.outputs]
        unknown = [n for n in names if n not in {o.name for o in self.outputs}]
        if unknown:
            raise InputRejected(f"unknown outputs requested: {unknown}")
        ro = ort.RunOptions()
        ro.log_severity_level = 4
        timer = None
        if max_seconds is not None:
            timer = threading.Timer(max_seconds, self._stop, (ro,))
            timer.daemon = True
        with self._active_lock:
            self._active.add(ro)
        try:
            if timer is not None:
                timer.start()
            values = self.session.run(names, feeds, ro)
        except Exception as e:  # onnxruntime raises its own classes; the message holds names and shapes
            if ro.terminate:
                limit = f"{max_seconds:g} s" if max_seconds is not None else "its time"
                raise RunLimitExceeded("run_time_exceeded", f"the run was stopped after the limit of {limit}") from None
            if _run_memory is not None and "BFCArena" in str(e):
                raise RunLimitExceeded("run_memory_exceeded", f"the run needs more memory than the {_run_memory} bytes "
                                       "allowed for runs in progress") from None
            raise InputRejected(f"the model could not run on these inputs: {_short(str(e))}") from None
        finally:
            if timer is not None:
                timer.cancel()
            with self._active_lock:
                self._active.discard(ro)
        if max_output_bytes is not None:
            total = sum(int(getattr(v, "nbytes", 0)) for v in values)
            if total > max_output_bytes:
                raise RunLimitExceeded("output_too_large", f"the outputs hold {total} bytes; the limit is "
                                       f"{max_output_bytes} bytes")
        return dict(zip(names, values, strict=True))

    @staticmethod
    def _stop(ro: ort.RunOptions) -> None:
        ro.terminate = True

    def stop_all(self) -> None:
        """Ask onnxruntime to stop every run of this model in progress (used at shutdown)."""
        with self._active_lock:
            for ro in self._active:
                ro.terminate = True


def build_session(data: bytes, intra_op_threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime session for ``data`` in which external data resolves to no file: the model has
    no path, and the external-initializer folder is a fresh empty directory (removed after loading);
    onnxruntime refuses paths that escape it. Raises :class:`ModelRejected`."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4
    if _run_memory is not None:
        opts.add_session_config_entry("session.use_env_allocators", "1")
    with tempfile.TemporaryDirectory(prefix="veil-no-external-data-") as empty:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", empty)
        try:
            return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelRejected(f"onnxruntime cannot load the model: {_short(str(e))}") from None


def load_served_model(data: bytes, sha256: str, intra_op_threads: int = 1) -> ServedModel:
    try:
        proto = onnx.load_model_from_string(data)
    except Exception:
        raise ModelRejected("the uploaded bytes are not a valid ONNX model (protobuf parse failed)") from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelRejected("the uploaded ONNX model has an empty graph")
    for name in external_data_tensors(proto):
        raise ModelRejected(f"tensor {name!r} refers to external data; upload a self-contained model")
    del proto
    model = ServedModel(sha256, build_session(data, intra_op_threads))
    for d in model.inputs:
        if d.dtype not in INPUT_DTYPES:
            raise ModelRejected(f"input {d.name!r} has type {d.dtype}; supported input dtypes: {', '.join(INPUT_DTYPES)}")
    return model
