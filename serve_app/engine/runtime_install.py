"""Which ONNX Runtime wheel is installed, and what to run when it is the wrong one.

The ``cpu`` extra installs ``onnxruntime``, the ``gpu`` extra ``onnxruntime-gpu``; both wheels
ship the same ``onnxruntime`` package, so with both installed the files of one overwrite the
other's and onnxruntime offers only the CPU provider. Standard library only: this runs before
anything imports onnxruntime.
"""

from __future__ import annotations

import importlib
from importlib import metadata

CPU_RUNTIME = "onnxruntime"
GPU_RUNTIME = "onnxruntime-gpu"
CUDA_MAJOR = 13  # onnxruntime-gpu 1.27+ (the gpu extra's floor) is built for CUDA 13
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")  # what the gpu extra adds
INSTALL_CPU = 'pip install "serve_app[cpu]"'
INSTALL_GPU = 'pip install "serve_app[gpu]"'
CHECKOUT_NOTE = "(in a checkout: pip install -e '.[cpu]' or '.[gpu]')"


class RuntimeMissingError(ImportError):
    """No usable ONNX Runtime is installed; the message says which extra to install."""


def installed_runtimes() -> list[str]:
    """The ONNX Runtime distributions installed, of ``onnxruntime`` and ``onnxruntime-gpu``."""
    found = []
    for name in (CPU_RUNTIME, GPU_RUNTIME):
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def require_onnxruntime() -> None:
    """Import onnxruntime or raise ``RuntimeMissingError`` naming the extras that provide it."""
    try:
        importlib.import_module("onnxruntime")
    except ImportError as missing:
        runtimes = installed_runtimes()
        if runtimes:  # a wheel is listed but its package is gone: one of two was uninstalled
            advice = (
                f"{' and '.join(runtimes)} is installed but onnxruntime cannot be imported "
                f"({missing}); reinstall one runtime: pip uninstall -y {CPU_RUNTIME} "
                f"{GPU_RUNTIME}, then {INSTALL_CPU} or {INSTALL_GPU}"
            )
        else:
            advice = (
                "no ONNX Runtime is installed; install serve_app with one runtime extra: "
                f"{INSTALL_CPU} (CPU) or {INSTALL_GPU} (NVIDIA GPU, CUDA {CUDA_MAJOR}) "
                f"{CHECKOUT_NOTE}"
            )
        raise RuntimeMissingError(advice, name="onnxruntime") from None


def missing_provider_fix(provider: str) -> str:
    """Why ``provider`` is absent from this install and the commands that add it."""
    if provider not in GPU_PROVIDERS:
        return (
            f"the extras provide the CPU, CUDA and TensorRT providers only ({INSTALL_CPU}, "
            f"{INSTALL_GPU}); {provider} needs an onnxruntime build that has it"
        )
    runtimes = installed_runtimes()
    if CPU_RUNTIME in runtimes and GPU_RUNTIME in runtimes:
        return (
            f"both {CPU_RUNTIME} and {GPU_RUNTIME} are installed and they share one package, "
            f"so onnxruntime offers only the CPU provider; remove both, then install the gpu "
            f"extra: pip uninstall -y {CPU_RUNTIME} {GPU_RUNTIME} && {INSTALL_GPU}"
        )
    if GPU_RUNTIME in runtimes:
        return (
            f"{GPU_RUNTIME} is installed but does not offer {provider}; reinstall the gpu "
            f"extra (CUDA {CUDA_MAJOR}): {INSTALL_GPU}"
        )
    replace = f"pip uninstall -y {CPU_RUNTIME} && " if CPU_RUNTIME in runtimes else ""
    return (
        f"{provider} needs the gpu extra (onnxruntime-gpu, CUDA {CUDA_MAJOR}) instead of the "
        f"CPU-only {CPU_RUNTIME}: {replace}{INSTALL_GPU}"
    )


def check_install(extra: str) -> str | None:
    """What is wrong with an install made with ``extra`` (``cpu`` or ``gpu``), or ``None``."""
    wanted = {"cpu": CPU_RUNTIME, "gpu": GPU_RUNTIME}[extra]
    runtimes = installed_runtimes()
    if runtimes != [wanted]:
        found = " and ".join(runtimes) or "no runtime"
        return f"the {extra} extra should install {wanted} alone, but found {found}"
    providers = importlib.import_module("onnxruntime").get_available_providers()
    if extra == "gpu" and "CUDAExecutionProvider" not in providers:
        return f"{GPU_RUNTIME} offers no CUDAExecutionProvider (providers: {', '.join(providers)})"
    return None
