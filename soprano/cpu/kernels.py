"""The native backend's compiled CPU kernels (soprano/cpu/csrc/qwen3_cpu.cpp).

They are built on first use for the CPU at hand (-march=native, -mcpu=native on ARM, or the
target that SOPRANO_KERNELS_MARCH names) with PyTorch's extension builder, and cached
(TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions); later loads take a moment. Each
build runs in a private folder that is renamed into place once it is complete, so a build killed
halfway leaves nothing that a later start waits for (PyTorch's own `lock` file would make every
later start hang). Where the kernels cannot be used (SOPRANO_KERNELS=off, a system other than
Linux, no C++ compiler, a failed build) the native backend runs its PyTorch path.
See README, "The compiled CPU kernels".
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

_LOGGER = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "qwen3_cpu.cpp"
SWITCH = "SOPRANO_KERNELS"
"""Environment variable: "off" (or 0, false, no) runs the PyTorch path without trying a build."""
MARCH = "SOPRANO_KERNELS_MARCH"
"""Environment variable: a -march target (e.g. haswell, x86-64-v3, armv8.2-a) that replaces
-march=native, to build for other CPUs than this one or to measure an older instruction set."""
_MARCH_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
FLAGS_ATTRIBUTE = "COMPILE_FLAGS"
"""The loaded module's attribute that records the flags it was compiled with."""


def native_flag(machine: str) -> str:
    """The flag that builds for this CPU. On ARM that is -mcpu=native, which GCC and clang both
    take there (clang before 15, such as Debian 12's, rejects -march=native on ARM) and which also
    tunes for the core."""
    return "-mcpu=native" if machine.lower().startswith(("aarch64", "arm")) else "-march=native"


NATIVE_FLAG = native_flag(platform.machine())
COMPILE_FLAGS = {
    "gcc": ["-O3", NATIVE_FLAG, "-ffp-contract=fast", "-fopenmp"],
    "clang": ["-O3", NATIVE_FLAG, "-ffp-contract=fast", "-fopenmp"],
}
"""-ffp-contract=fast lets the compiler fuse multiply-adds (C++17 mode turns that off in GCC;
clang's default fuses only within one expression); -fopenmp makes at::parallel_for run threads."""
LINK_FLAGS = {"gcc": [], "clang": ["-fopenmp"]}
"""GCC's OpenMP calls resolve to the libgomp that PyTorch loads; clang's (__kmpc_*) need libomp
(Debian/Ubuntu: apt install libomp-dev), which -fopenmp links."""
_ERROR_LINE = re.compile(r"\berror\b", re.IGNORECASE)
_NOT_DIAGNOSTICS = ("Error building extension", "[", "FAILED:")
"""Lines of the build output that name the failure without saying it: PyTorch's summary, ninja's
commands (whose paths may contain "error") and ninja's list of failed targets."""


class BuildError(Exception):
    """The kernels could not be built; the message is the build's whole output."""


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The compiled module, or None (with one log line) where it cannot be built or is off."""
    reason = _switched_off()
    if reason is not None:
        _LOGGER.info("%s: the native backend runs its PyTorch path", reason)
        return None
    try:
        version = _compiler()
        family = compiler_family(version)
        flags = compile_flags(family)
        module = load_extension(
            f"soprano_qwen3_cpu_{_build_tag(version, flags, family)}",
            SOURCE,
            flags,
            LINK_FLAGS[family],
        )
        setattr(module, FLAGS_ATTRIBUTE, " ".join(flags))
        _LOGGER.debug("Native CPU kernels loaded: %s", describe(build_info(module)))
        return module
    except Exception as error:  # a missing compiler, a failed build or import, and more
        _LOGGER.warning(
            "Could not build the native CPU kernels, using the slower PyTorch path: %s",
            first_error(str(error)) or type(error).__name__,
        )
        _LOGGER.debug("The kernels' build output:\n%s", error)
        return None


def unavailable_reason() -> str | None:
    """Why this machine is not expected to have the kernels (switched off, not Linux, no
    compiler), or None where `cpu_kernels` ought to succeed. For tests that need them."""
    reason = _switched_off()
    if reason is not None:
        return reason
    try:
        _compiler()
    except BuildError as error:
        return str(error)
    return None


def load_extension(
    name: str, source: Path, compile_flags: list[str], link_flags: list[str]
) -> ModuleType:
    """Import the extension `name` built from `source`, building it first if it is not cached.

    The name must change with anything that changes the build (see `_build_tag`): a folder of
    that name is only ever created complete, so its presence means the build is done.
    """
    from torch.utils.cpp_extension import load

    root = extensions_root()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / name
    library = folder / f"{name}.so"
    if library.is_file():
        return _import(name, library)
    _LOGGER.info("Compiling the native CPU kernels for this machine (about a minute, once)")
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        try:
            # is_python_module=False: the build is imported once, from its final place.
            load(
                name,
                [str(source)],
                extra_cflags=compile_flags,
                extra_ldflags=link_flags,
                build_directory=str(staging),
                is_python_module=False,
            )
        except (RuntimeError, subprocess.SubprocessError, OSError) as error:
            raise BuildError(str(error)) from error
        _move_into_place(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _import(name, library)


def _move_into_place(staging: Path, folder: Path) -> None:
    """Rename the finished build to `folder`, unless a concurrent build got there first.

    A `folder` without the library is left from an interrupted build of an older version of this
    module (or of PyTorch's own locking): it is replaced."""
    try:
        staging.rename(folder)
        return
    except OSError:
        if (folder / f"{folder.name}.so").is_file():
            return
    _LOGGER.info("Replacing the unfinished build folder %s", folder)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def _import(name: str, library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise BuildError(f"cannot import {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def first_error(output: str) -> str:
    """The line of a build's output that says what went wrong: the first compiler or linker line
    that mentions an error, else the last line (ninja's own summary says nothing useful)."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    for line in lines:
        if _ERROR_LINE.search(line) and not line.startswith(_NOT_DIAGNOSTICS):
            return line
    return lines[-1] if lines else ""


def extensions_root() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or _default_root())


def _default_root() -> str:
    from torch.utils.cpp_extension import get_default_build_root

    return get_default_build_root()


def _switched_off() -> str | None:
    if os.environ.get(SWITCH, "").strip().lower() in ("off", "0", "false", "no"):
        return f"{SWITCH}={os.environ[SWITCH]}"
    if platform.system() != "Linux":
        return f"The native CPU kernels are built on Linux only (this is {platform.system()})"
    return None


def _compiler() -> str:
    """The C++ compiler PyTorch's builder runs (CXX, else c++), as its --version's first line."""
    command = os.environ.get("CXX", "c++")
    try:
        result = subprocess.run(
            [command, "--version"], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError) as error:
        raise BuildError(f"no working C++ compiler (CXX={command}): {error}") from error
    return result.stdout.strip().splitlines()[0] if result.stdout.strip() else command


def compile_flags(family: str) -> list[str]:
    """The compiler flags for `family`, with the target SOPRANO_KERNELS_MARCH names, if any."""
    march = os.environ.get(MARCH, "").strip()
    if not march:
        return list(COMPILE_FLAGS[family])
    if not _MARCH_VALUE.fullmatch(march):
        raise BuildError(f"{MARCH}={march!r} is not a -march target (such as haswell)")
    return [f"-march={march}" if flag == NATIVE_FLAG else flag for flag in COMPILE_FLAGS[family]]


def build_info(module: ModuleType) -> dict[str, object]:
    """What a loaded build targets (from its compiler's predefined macros), how it was compiled
    and how many threads it runs: for benchmarks and bug reports."""
    info: dict[str, object] = dict(module.build_info())
    info["flags"] = getattr(module, FLAGS_ATTRIBUTE, "unknown")
    info["threads"] = module.threads()
    info["torch_threads"] = torch.get_num_threads()
    return info


def describe(info: dict[str, object]) -> str:
    """build_info in one line: 'AVX-512 (AVX2 FMA ...), gcc 12.2.0, -O3 ..., 2 threads (PyTorch's
    operators 1)'."""
    features = info.get("features")
    listed = " ".join(features) if isinstance(features, list) else ""
    return (
        f"{info['isa']} ({listed}), {info['compiler']}, {info['flags']}, {info['threads']} threads"
        f" (PyTorch's operators {info['torch_threads']})"
    )


def compiler_family(version: str) -> str:
    """'clang' or 'gcc' (the default: GCC-compatible flags), from the compiler's --version."""
    return "clang" if "clang" in version.lower() else "gcc"


def main() -> int:
    """`python -m soprano.cpu.kernels`: build now (as script/setup does), not on first use."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kernels = cpu_kernels()
    if kernels is None:
        return 1
    _LOGGER.info("Native CPU kernels ready: %s", kernels.__file__)
    _LOGGER.info("Built for %s", describe(build_info(kernels)))
    return 0


def _build_tag(compiler: str, flags: list[str], family: str) -> str:
    """Names the build after everything it depends on: the source, the compiler and its flags
    (the target among them), this CPU's features (which NATIVE_FLAG builds for), this Python and
    this PyTorch (their ABIs), so that neither a copied cache, an upgrade nor an edit loads a
    stale build."""
    features = (
        f"{platform.machine()} python {sys.version_info[:2]} torch {torch.__version__} "
        f"{compiler} {flags} {LINK_FLAGS[family]} "
    )
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            features += next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    digest = hashlib.sha256(features.encode())
    digest.update(SOURCE.read_bytes())
    return digest.hexdigest()[:12]


if __name__ == "__main__":
    raise SystemExit(main())
