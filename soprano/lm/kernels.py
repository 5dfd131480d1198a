"""The native backend's compiled CPU kernels (soprano/lm/csrc/qwen3_cpu.cpp).

They are built on first use for the CPU at hand (-march=native) with PyTorch's extension builder,
and cached (TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions); later loads take a
moment. Where no C++ compiler is found the native backend runs its PyTorch path instead.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path
from types import ModuleType

import torch

_LOGGER = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "qwen3_cpu.cpp"
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"]
"""-ffp-contract=fast lets the compiler fuse multiply-adds (C++17 mode turns that off);
-fopenmp makes at::parallel_for use PyTorch's own OpenMP threads."""


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The compiled module, or None (with a warning, once) where it cannot be built."""
    try:
        from torch.utils.cpp_extension import load

        _LOGGER.info("Loading the native CPU kernels (the first time compiles them, ~1 min)")
        return load(
            name=f"soprano_qwen3_cpu_{_build_tag()}",
            sources=[str(SOURCE)],
            extra_cflags=FLAGS,
            verbose=False,
        )
    except Exception as error:  # a missing compiler or ninja fails in many ways
        _LOGGER.warning(
            "Could not build the native CPU kernels, using the slower PyTorch path: %s",
            str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__,
        )
        return None


def main() -> int:
    """`python -m soprano.lm.kernels`: build now (as script/setup does) rather than on first use."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kernels = cpu_kernels()
    if kernels is None:
        return 1
    _LOGGER.info("Native CPU kernels ready: %s", kernels.__file__)
    return 0


def _build_tag() -> str:
    """Names the build after what it is only good for: this CPU's features (-march=native) and
    this PyTorch (its C++ ABI), so that neither a copied cache nor an upgrade loads a stale one."""
    features = f"{platform.machine()} torch {torch.__version__} "
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            features += next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha256(features.encode()).hexdigest()[:12]


if __name__ == "__main__":
    raise SystemExit(main())
