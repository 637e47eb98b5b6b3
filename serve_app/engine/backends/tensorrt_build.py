"""Building the native TensorRT engine from a model's ONNX file, cached on disk.

An engine is specific to the model's bytes, the GPU it was built on, the TensorRT version and
the optimization profiles (the deployment's batch and prompt limits), so those are its cache
key. The model is identified by a SHA-256 of the ONNX file and its external weights: unlike a
path and modification time, that survives copying a model to another mount or node, so an
engine built once (``python -m serve_app.tools build-trt``) is found by every replica, and a
retrained model can never be served with a stale engine. Hashing reads the weights once per
file version; the digest is remembered beside the engines, keyed by path, size and times.

Precision comes from the ONNX file (export it in fp16): networks are strongly typed, so no
precision flags are set. Everything that needs ``tensorrt`` or ``cuda-python`` imports them
when called, so this module loads, and its pure parts are tested, on machines without a GPU.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO, Any

import onnx
from tqdm import tqdm

from serve_app.engine.backends.tensorrt_profiles import Shape, ShapeProfile, decoder_profiles
from serve_app.engine.config import EngineConfig
from serve_app.engine.decoder import ModelIO, read_onnx_signature
from serve_app.engine.errors import EngineError
from serve_app.engine.model_config import ModelConfig, ModelLoadError

logger = logging.getLogger(__name__)

GPU_EXTRA = "install the gpu extra: pip install 'serve_app[gpu]' (or '.[gpu]' in a checkout)"
RECIPE = 1  # bump when the build settings change, so engines built the old way are not reused
_CHUNK = 16 * 2**20


def import_tensorrt() -> Any:
    """The ``tensorrt`` module (10 or newer); raises ``ModelLoadError`` saying how to get it."""
    try:
        import tensorrt
    except ImportError as missing:
        raise ModelLoadError(
            f"backend tensorrt needs the tensorrt package (TensorRT 10 or newer), which cannot "
            f"be imported ({missing}); {GPU_EXTRA}"
        ) from None
    if tensorrt_major(tensorrt.__version__) < 10:
        raise ModelLoadError(
            f"tensorrt {tensorrt.__version__} is installed but backend tensorrt needs 10 or "
            f"newer; {GPU_EXTRA}"
        )
    return tensorrt


def import_cudart() -> Any:
    """cuda-python's CUDA runtime module; raises ``ModelLoadError`` saying how to get it."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):  # the second: older cuda-python
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ModelLoadError(
        f"backend tensorrt needs the cuda-python package (CUDA streams), which cannot be "
        f"imported; {GPU_EXTRA}"
    )


def tensorrt_major(version: str) -> int:
    """The major version of a TensorRT version string such as ``10.13.0.35``."""
    return int(version.split(".", 1)[0])


def cuda_call(result: tuple[Any, ...]) -> Any:
    """The value a cuda-python call returns after its error code; raises ``EngineError``."""
    error, *values = result
    if error.value != 0:  # cudaSuccess
        raise EngineError(f"CUDA call failed: {error}")
    return values[0] if values else None


def read_model(config: EngineConfig) -> tuple[ModelConfig, ModelIO]:
    """The model's config and tensor layout, read from its directory without the weights."""
    model = ModelConfig.from_dir(config.model_path)
    onnx_path = config.model_path / config.onnx_file
    if not onnx_path.is_file():
        raise ModelLoadError(f"{config.onnx_file} not found in {config.model_path}")
    inputs, outputs = read_onnx_signature(onnx_path)
    return model, ModelIO.from_signature(inputs, outputs, model)


def deployment_profiles(
    config: EngineConfig, model: ModelConfig, io: ModelIO
) -> list[ShapeProfile]:
    """The prefill and decode profiles for the deployment's batch and prompt limits."""
    return decoder_profiles(
        io, config.max_num_seqs, config.max_prefill_tokens, model.context_length
    )


def profile_shapes(profile: ShapeProfile) -> dict[str, tuple[Shape, Shape, Shape]]:
    """``{input: (min, opt, max)}``: what ``IOptimizationProfile.set_shape`` takes."""
    return {name: (bounds.min, bounds.opt, bounds.max) for name, bounds in profile.inputs.items()}


@dataclass(frozen=True)
class EngineSpec:
    """Everything a serialized engine depends on; its hash names the engine's cache file."""

    model_sha256: str
    gpu_name: str
    compute_capability: tuple[int, int]
    tensorrt_version: str
    profiles: tuple[ShapeProfile, ...]

    def describe(self) -> dict[str, Any]:
        """The ingredients as JSON-ready data, also written beside the engine for operators."""
        return {
            "recipe": RECIPE,
            "model_sha256": self.model_sha256,
            "gpu": self.gpu_name,
            "compute_capability": ".".join(map(str, self.compute_capability)),
            "tensorrt": self.tensorrt_version,
            "profiles": [
                {"name": p.name, "inputs": {k: list(v) for k, v in profile_shapes(p).items()}}
                for p in self.profiles
            ],
        }

    @property
    def key(self) -> str:
        """A stable hash of ``describe()``."""
        text = json.dumps(self.describe(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def engine_path(cache_dir: Path, spec: EngineSpec) -> Path:
    """Where the engine for ``spec`` is cached."""
    return cache_dir / "native" / f"{spec.key}.engine"


def model_sha256(onnx_path: Path, cache_dir: Path) -> str:
    """SHA-256 over the ONNX file and the external weight files it names, in that order."""
    combined = hashlib.sha256()
    for path in [onnx_path, *external_data_files(onnx_path)]:
        combined.update(file_sha256(path, cache_dir / "digests").encode())
    return combined.hexdigest()


def external_data_files(onnx_path: Path) -> list[Path]:
    """The files holding the graph's external initializers (``model.onnx.data`` and the like)."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    locations = {
        entry.value
        for tensor in graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [onnx_path.parent / location for location in sorted(locations)]


def file_sha256(path: Path, memo_dir: Path) -> str:
    """A file's SHA-256, remembered in ``memo_dir`` for this path, size and modification."""
    stat = path.stat()
    version = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"
    memo = memo_dir / f"{hashlib.sha256(version.encode()).hexdigest()[:32]}.sha256"
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    write_atomically(memo, digest.hexdigest().encode())
    return digest.hexdigest()


def write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Write ``path`` so that readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def gpu_identity(cudart: Any, device_index: int) -> tuple[str, tuple[int, int]]:
    """The GPU's name and compute capability, e.g. ``("NVIDIA H100 80GB HBM3", (9, 0))``."""
    props = cuda_call(cudart.cudaGetDeviceProperties(device_index))
    name = props.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    return str(name), (int(props.major), int(props.minor))


def ensure_engine(
    config: EngineConfig, profiles: list[ShapeProfile], *, show_progress: bool = True
) -> Path:
    """The cached engine for the model, this GPU and ``profiles``, built first if missing.

    Replicas that start together on one machine build once: the others wait on a file lock
    and then find the engine.
    """
    trt, cudart = import_tensorrt(), import_cudart()
    cuda_call(cudart.cudaSetDevice(config.device_id))
    onnx_path = config.model_path / config.onnx_file
    gpu_name, capability = gpu_identity(cudart, config.device_id)
    spec = EngineSpec(
        model_sha256=model_sha256(onnx_path, config.tensorrt_cache_dir),
        gpu_name=gpu_name,
        compute_capability=capability,
        tensorrt_version=trt.__version__,
        profiles=tuple(profiles),
    )
    path = engine_path(config.tensorrt_cache_dir, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path.with_suffix(".lock")):
        if path.is_file():
            logger.info("using the cached TensorRT engine %s", path)
            return path
        logger.info(
            "building a TensorRT engine for %s on %s; this takes minutes", onnx_path, gpu_name
        )
        timing_cache = path.parent / f"timing-{_timing_key(spec)}.cache"
        write_atomically(path, build_engine(trt, onnx_path, profiles, timing_cache, show_progress))
        write_atomically(path.with_suffix(".json"), json.dumps(spec.describe(), indent=2).encode())
        logger.info("wrote the TensorRT engine %s", path)
    return path


def build_engine(
    trt: Any,
    onnx_path: Path,
    profiles: list[ShapeProfile],
    timing_cache: Path,
    show_progress: bool,
) -> memoryview:
    """Parse ``onnx_path`` and build a serialized engine with one optimization profile each."""
    builder = trt.Builder(tensorrt_logger(trt))
    flags = 0  # TensorRT 11 networks are always strongly typed; the flag is deprecated there
    if tensorrt_major(trt.__version__) < 11:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, tensorrt_logger(trt))
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelLoadError(
            f"TensorRT could not parse {onnx_path}: " + ("; ".join(errors) or "no reason given")
        )
    config = builder.create_builder_config()
    _add_profiles(builder, network, config, profiles)
    cached = timing_cache.read_bytes() if timing_cache.is_file() else b""
    timings = config.create_timing_cache(cached)  # the config keeps a pointer: hold it
    if not config.set_timing_cache(timings, False):
        logger.warning(
            "ignoring the timing cache %s: made by another GPU or TensorRT", timing_cache
        )
    progress = BuildProgress() if show_progress else None
    monitor = None if progress is None else _progress_monitor(trt, progress)
    if monitor is not None:
        config.progress_monitor = monitor  # TensorRT keeps a raw pointer; `monitor` holds it
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if progress is not None:
            progress.close()
    if serialized is None:
        raise ModelLoadError(f"TensorRT failed to build an engine from {onnx_path}; see its log")
    write_atomically(timing_cache, memoryview(config.get_timing_cache().serialize()))
    return memoryview(serialized)


def _add_profiles(builder: Any, network: Any, config: Any, profiles: list[ShapeProfile]) -> None:
    """One optimization profile per entry of ``profiles``, in order (their indices)."""
    input_names = [network.get_input(i).name for i in range(network.num_inputs)]
    for expected, profile in enumerate(profiles):
        optimization_profile = builder.create_optimization_profile()
        shapes = profile_shapes(profile)
        for name in input_names:
            if name not in shapes:
                raise ModelLoadError(f"the {profile.name} profile has no shapes for input {name}")
            optimization_profile.set_shape(name, *shapes[name])
        if config.add_optimization_profile(optimization_profile) != expected:
            raise ModelLoadError(f"TensorRT rejected the {profile.name} optimization profile")


@cache
def tensorrt_logger(trt: Any) -> Any:
    """One logger per process: TensorRT objects must not outlive the logger they were given."""
    return trt.Logger(trt.Logger.WARNING)


class BuildProgress:
    """TensorRT's nested build phases as tqdm bars, one line per open phase.

    TensorRT may report from several threads, hence the lock.
    """

    def __init__(self, file: IO[str] | None = None) -> None:
        self._file = file
        self._bars: dict[str, tqdm] = {}
        self._lock = threading.Lock()

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        """A phase of ``num_steps`` steps began (inside ``parent_phase`` when given)."""
        with self._lock:
            depth = len(self._bars)
            self._bars[phase_name] = tqdm(
                total=num_steps,
                desc=phase_name,
                unit="step",
                position=depth,
                leave=depth == 0,
                file=self._file,
            )

    def step_complete(self, phase_name: str, step: int) -> bool:
        """Step ``step`` (0-based) of a phase finished; True lets the build go on."""
        with self._lock:
            bar = self._bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)
        return True

    def phase_finish(self, phase_name: str) -> None:
        """A phase ended, possibly before all its steps were reported."""
        with self._lock:
            bar = self._bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    def close(self) -> None:
        """Close the bars of phases TensorRT left open (a failed build)."""
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()


def _progress_monitor(trt: Any, progress: BuildProgress) -> Any:
    """A ``trt.IProgressMonitor`` that reports to ``progress``."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)  # pybind11 needs the base initialised explicitly

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return progress.step_complete(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            progress.phase_finish(phase_name)

    return Monitor()


def _timing_key(spec: EngineSpec) -> str:
    """Timing caches hold kernel timings, valid for any model on the same GPU and TensorRT."""
    text = f"{spec.gpu_name}|{spec.compute_capability}|{spec.tensorrt_version}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
