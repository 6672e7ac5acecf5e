"""TensorRT engines: build from an ONNX graph, cache beside it, run with `execute_async_v3`.

`tensorrt` is imported inside the functions that need it, never at module import, so the cache
logic (pure Python) works and is tested on machines without TensorRT or a GPU.

Cache: an engine is valid for one ONNX file (its bytes), one precision, one TensorRT version and
one GPU compute capability. These fields are hashed into a key; the engine is written as
`<graph>.<key[:12]>.engine` beside `<graph>.onnx` with a JSON sidecar holding the fields and the
engine's own SHA-256. `find_engine` returns an engine only when its sidecar matches all of them.
An engine whose ONNX file has changed, or whose sidecar is missing or inconsistent, can never be
valid again and is deleted; an engine for another TensorRT version, GPU or precision is left for
the machine it belongs to and skipped. Each is reported in one log line.

TensorRT Python API used (checked against NVIDIA's TensorRT 10.x / 11.x Python API reference):
- `Builder.create_network(1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED))`: tensor types
  come from the graph (see `mimood.export.fp16`). TensorRT 11 deprecates the flag because it is
  always strongly typed, and keeps it for API compatibility (ignored).
- `OnnxParser.parse_from_file`, `num_errors`, `get_error(i)`.
- `IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)`,
  `create_timing_cache(blob)` (an empty blob gives a new cache), `set_timing_cache(cache,
  ignore_mismatch)`, `get_timing_cache().serialize()`; `Builder.build_serialized_network`.
- `Runtime.deserialize_cuda_engine`, `ICudaEngine.num_io_tensors`, `get_tensor_name(i)`,
  `get_tensor_mode(name)` (`TensorIOMode.INPUT/OUTPUT`), `get_tensor_shape`, `get_tensor_dtype`;
  `IExecutionContext.set_tensor_address(name, ptr)`, `execute_async_v3(stream_handle)`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from mimood.contract import atomic_write, file_sha256
from mimood.errors import InputError

log = logging.getLogger(__name__)
KEY_FIELDS = ("onnx_sha256", "precision", "tensorrt", "compute_capability")


def trt_available() -> tuple[bool, str]:
    """Whether engines can be built and run here, and if not, why (one short phrase)."""
    try:
        import tensorrt
    except ImportError:
        return False, "tensorrt not installed"
    try:
        import torch
    except ImportError:
        return False, "torch not installed (TrtSession binds torch CUDA buffers)"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    return True, f"tensorrt {tensorrt.__version__} on {torch.cuda.get_device_name()}"


def current_platform() -> tuple[str, str]:
    """(TensorRT version, compute capability "major.minor" of the current CUDA device)."""
    import tensorrt
    import torch

    major, minor = torch.cuda.get_device_capability()
    return tensorrt.__version__, f"{major}.{minor}"


def _fields(onnx_sha256: str, precision: str, trt_version: str, compute_capability: str) -> dict:
    return dict(zip(KEY_FIELDS, (onnx_sha256, precision, trt_version, compute_capability)))


def _key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def engine_key(onnx_path: str | Path, precision: str, trt_version: str,
               compute_capability: str) -> str:
    """SHA-256 over the ONNX file's hash, the precision, TensorRT version and compute capability."""
    return _key(_fields(file_sha256(onnx_path), precision, trt_version, compute_capability))


def engine_path(onnx_path: str | Path, key: str) -> Path:
    """`<dir>/<graph>.<key[:12]>.engine` beside `<dir>/<graph>.onnx`."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(f"{onnx_path.stem}.{key[:12]}.engine")


def _sidecar(engine: Path) -> Path:
    return engine.with_name(engine.name + ".json")


def save_engine(onnx_path: str | Path, precision: str, trt_version: str, compute_capability: str,
                engine_bytes: bytes) -> Path:
    """Write an engine and its sidecar atomically (engine first: a sidecar never points at
    nothing) and return the engine's path."""
    fields = _fields(file_sha256(onnx_path), precision, trt_version, compute_capability)
    key = _key(fields)
    path = engine_path(onnx_path, key)
    with atomic_write(path) as tmp:
        tmp.write_bytes(engine_bytes)
    meta = {**fields, "key": key, "onnx_file": Path(onnx_path).name,
            "engine_sha256": hashlib.sha256(engine_bytes).hexdigest()}
    with atomic_write(_sidecar(path)) as tmp:
        tmp.write_bytes((json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return path


def _read_sidecar(engine: Path) -> dict | None:
    try:
        meta = json.loads(_sidecar(engine).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def find_engine(onnx_path: str | Path, precision: str, trt_version: str | None = None,
                compute_capability: str | None = None) -> Path | None:
    """The cached engine for this graph, precision and platform (the current TensorRT and GPU
    unless given), or None. Stale engines are deleted, foreign ones skipped (module docstring)."""
    onnx_path = Path(onnx_path)
    if trt_version is None or compute_capability is None:
        trt_version, compute_capability = current_platform()
    want = _fields(file_sha256(onnx_path), precision, trt_version, compute_capability)
    pattern = re.compile(re.escape(onnx_path.stem) + r"\.[0-9a-f]{12}\.engine")
    found = None
    for engine in sorted(onnx_path.parent.glob(f"{onnx_path.stem}.*.engine")):
        if not pattern.fullmatch(engine.name):
            continue  # another graph whose name starts like this one (e.g. `atd.fp16.onnx`)
        meta = _read_sidecar(engine)
        if meta is None:
            why = "its sidecar is missing or unreadable"
        elif meta.get("key") != _key({k: meta.get(k) for k in KEY_FIELDS}) \
                or engine != engine_path(onnx_path, meta["key"]):
            why = "its sidecar does not match its name"
        elif meta["onnx_sha256"] != want["onnx_sha256"]:
            why = f"{onnx_path.name} changed since it was built"
        elif file_sha256(engine) != meta.get("engine_sha256"):
            why = "its bytes differ from those recorded at build time"
        else:
            other = [f"{k} {meta[k]} != {want[k]}" for k in KEY_FIELDS if meta[k] != want[k]]
            if other:
                log.info("skipping engine %s (built for another TensorRT, GPU or precision: %s)",
                         engine.name, ", ".join(other))
            else:
                found = engine
            continue
        log.warning("deleting stale engine %s: %s", engine, why)
        engine.unlink(missing_ok=True)
        _sidecar(engine).unlink(missing_ok=True)
    return found


def build_engine(onnx_path: str | Path, precision: str, timing_cache: str | Path,
                 workspace_gb: int = 4) -> Path:
    """Build a static-shape engine from `onnx_path`, cached beside it; the timing cache is read
    from and written back to `timing_cache`. Precision is the graph's (strongly typed network);
    `precision` only labels the engine."""
    import tensorrt as trt

    onnx_path, timing_cache = Path(onnx_path), Path(timing_cache)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(onnx_path, f"TensorRT cannot parse this graph: {errors}")
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if any(d < 0 for d in t.shape):
            raise InputError(onnx_path, f"input {t.name} has a dynamic shape {tuple(t.shape)}; "
                                        "graphs are exported with static shapes")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gb << 30)
    blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # setTimingCache returns false for a cache made on another device or TensorRT version
        log.info("timing cache %s does not fit this GPU/TensorRT; starting a new one", timing_cache)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT failed to build an engine (see its log above)")
    with atomic_write(timing_cache) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    trt_version, capability = current_platform()
    return save_engine(onnx_path, precision, trt_version, capability, bytes(serialized))


def ensure_engine(onnx_path: str | Path, precision: str, timing_cache: str | Path) -> Path:
    """The cached engine for this graph on this machine, built if there is none."""
    return find_engine(onnx_path, precision) or build_engine(onnx_path, precision, timing_cache)


class TrtSession:
    """One engine, one execution context and one device buffer per I/O tensor, allocated once
    and bound once with `set_tensor_address`. Buffers are torch CUDA tensors: torch owns the
    CUDA context and the stream (the current torch stream), so no pycuda/cuda-python is needed.

    `run` returns the bound output buffers themselves: they are overwritten by the next run,
    so clone what must be kept. Feeding `session.buffers[name]` (filled in place) skips the copy.
    """

    def __init__(self, engine: str | Path, device: str = "cuda"):
        import tensorrt as trt
        import torch

        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                  trt.DataType.BF16: torch.bfloat16, trt.DataType.INT32: torch.int32,
                  trt.DataType.INT64: torch.int64, trt.DataType.INT8: torch.int8,
                  trt.DataType.BOOL: torch.bool}
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine).read_bytes())
        if self.engine is None:
            raise InputError(engine, "TensorRT cannot load this engine")
        self.context = self.engine.create_execution_context()
        self.buffers: dict[str, torch.Tensor] = {}
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))  # static: no -1
            buf = torch.empty(shape, dtype=dtypes[self.engine.get_tensor_dtype(name)], device=device)
            self.context.set_tensor_address(name, buf.data_ptr())
            self.buffers[name] = buf
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(name)

    def run(self, feeds: dict) -> dict:
        """Copy `feeds` (torch tensors, any device) into the input buffers, enqueue the engine on
        the current torch CUDA stream, and return the output buffers by name."""
        import torch

        for name in self.inputs:
            buf, x = self.buffers[name], feeds[name]
            if x.shape != buf.shape:
                raise ValueError(f"input {name}: shape {tuple(x.shape)} != engine {tuple(buf.shape)}")
            if x.data_ptr() != buf.data_ptr():
                buf.copy_(x, non_blocking=True)
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log above)")
        return {name: self.buffers[name] for name in self.outputs}
