"""Building the native CPU kernels: never a hang, a failure says why, flags suit the compiler.

Most tests build a tiny C extension (one OpenMP loop, a second or two to compile) through the
same `load_extension` that builds the real kernels; the real kernels are tested in
tests/test_native_lm.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from soprano.cpu import kernels

BUILD_TIMEOUT = 240.0
"""Generous for a loaded machine; it only turns a hang into a failure."""

TINY_SOURCE = r"""
#include <Python.h>
#include <omp.h>

static PyObject* threads(PyObject*, PyObject*) {
  int count = 0;
#pragma omp parallel
  {
#pragma omp atomic
    count++;
  }
  return PyLong_FromLong(count);
}

static PyMethodDef methods[] = {{"threads", threads, METH_NOARGS, nullptr},
                                {nullptr, nullptr, 0, nullptr}};
#define STRING(x) #x
#define NAME(x) STRING(x)
#define INIT(x) PyInit_##x
#define INIT_OF(x) INIT(x)
static PyModuleDef module = {PyModuleDef_HEAD_INIT, NAME(TORCH_EXTENSION_NAME), nullptr, -1,
                             methods};
PyMODINIT_FUNC INIT_OF(TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module); }
"""

KEEP_TORCH_LINKED = "-Wl,--no-as-needed"
"""The kernels find GCC's OpenMP runtime through libtorch_cpu, which they use (its libgomp). The
tiny extension uses nothing of torch, so --as-needed (Debian's GCC default) would drop libtorch_cpu
from it; x86 wheels of torch load libgomp for everyone anyway, ARM ones do not."""

BUILD_AND_CALL = f"""
import sys
from pathlib import Path
from soprano.cpu.kernels import COMPILE_FLAGS, LINK_FLAGS, load_extension
name, source, family = sys.argv[1:]
link = ["{KEEP_TORCH_LINKED}", *LINK_FLAGS[family]]
module = load_extension(name, Path(source), COMPILE_FLAGS[family], link)
print(module.threads())
"""


@pytest.fixture
def tiny_source(tmp_path: Path) -> Path:
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_SOURCE)
    return source


def build_in_subprocess(
    root: Path, name: str, source: Path, family: str = "gcc", **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BUILD_AND_CALL, name, str(source), family],
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(root), **env},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )


def test_a_stale_lock_from_a_killed_build_does_not_hang(tmp_path: Path, tiny_source: Path):
    """PyTorch's builder waits forever for a `lock` that a killed build left behind."""
    root, name = tmp_path / "extensions", "soprano_test_stale_lock"
    (root / name).mkdir(parents=True)
    (root / name / "lock").touch()
    built = build_in_subprocess(root, name, tiny_source)
    assert built.returncode == 0, built.stderr
    assert int(built.stdout) >= 1
    assert sorted(path.name for path in root.iterdir()) == [name]  # no staging folder left
    assert not (root / name / "lock").exists()

    again = build_in_subprocess(root, name, tiny_source, CXX="/nonexistent/c++")
    assert again.returncode == 0, "a finished build loads without compiling: " + again.stderr


def test_a_failed_build_logs_the_compiler_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    broken = tmp_path / "broken.cpp"
    broken.write_text('#include <Python.h>\n#error "deliberately broken for a test"\n')
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.delenv(kernels.SWITCH, raising=False)
    monkeypatch.setattr(kernels, "SOURCE", broken)
    with caplog.at_level(logging.DEBUG, logger="soprano.cpu.kernels"):
        assert kernels.cpu_kernels.__wrapped__() is None
    [warning] = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert "Could not build the native CPU kernels" in warning.getMessage()
    assert warning.getMessage().endswith('error: #error "deliberately broken for a test"')
    [debug] = [record for record in caplog.records if record.levelno == logging.DEBUG]
    assert "ninja: build stopped" in debug.getMessage()
    assert not [path for path in (tmp_path / "extensions").iterdir()], "a failed build is kept"


def test_first_error_skips_the_summary_lines():
    output = (
        "Error building extension 'x': [1/2] c++ -c x.cpp -o x.o\n"
        "[1/2] c++ -I/home/error/include -c x.cpp -o x.o\nFAILED: x.o\n"
        "x.cpp:3:5: error: 'y' was not declared in this scope\nx.cpp:9:1: error: later\n"
        "ninja: build stopped: subcommand failed."
    )
    assert kernels.first_error(output) == "x.cpp:3:5: error: 'y' was not declared in this scope"
    assert kernels.first_error("ImportError: undefined symbol\n") == "ImportError: undefined symbol"


@pytest.mark.parametrize("value", ["off", "0", "False"])
def test_the_switch_turns_the_kernels_off_without_a_build(
    value: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setenv(kernels.SWITCH, value)
    monkeypatch.setattr(kernels, "load_extension", pytest.fail)
    with caplog.at_level(logging.INFO, logger="soprano.cpu.kernels"):
        assert kernels.cpu_kernels.__wrapped__() is None
    assert caplog.messages == [f"SOPRANO_KERNELS={value}: the native backend runs its PyTorch path"]
    assert kernels.unavailable_reason() == f"SOPRANO_KERNELS={value}"


def test_other_systems_use_the_pytorch_path_with_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.delenv(kernels.SWITCH, raising=False)
    monkeypatch.setattr(kernels.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(kernels, "load_extension", pytest.fail)
    with caplog.at_level(logging.INFO, logger="soprano.cpu.kernels"):
        assert kernels.cpu_kernels.__wrapped__() is None
    assert len(caplog.messages) == 1
    assert "Linux only (this is Darwin)" in caplog.messages[0]


def test_no_compiler_is_reported_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.delenv(kernels.SWITCH, raising=False)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernels, "load_extension", pytest.fail)
    with caplog.at_level(logging.WARNING, logger="soprano.cpu.kernels"):
        assert kernels.cpu_kernels.__wrapped__() is None
    assert "no working C++ compiler (CXX=" in caplog.text
    assert "no working C++ compiler" in str(kernels.unavailable_reason())


@pytest.mark.parametrize(
    ("version", "family"),
    [
        ("c++ (Debian 12.2.0-14+deb12u1) 12.2.0", "gcc"),
        ("g++ (GCC) 13.2.1 20231205 (Red Hat 13.2.1-6)", "gcc"),
        ("Debian clang version 14.0.6", "clang"),
        ("Ubuntu clang version 18.1.3 (1ubuntu1)", "clang"),
    ],
)
def test_the_compiler_family_is_recognised(version: str, family: str):
    assert kernels.compiler_family(version) == family


@pytest.mark.parametrize(
    ("machine", "flag"),
    [
        ("x86_64", "-march=native"),
        ("aarch64", "-mcpu=native"),  # Linux's name; clang 14 rejects -march=native there
        ("arm64", "-mcpu=native"),
        ("armv7l", "-mcpu=native"),
    ],
)
def test_the_native_flag_suits_the_architecture(machine: str, flag: str):
    assert kernels.native_flag(machine) == flag
    assert all(kernels.NATIVE_FLAG in flags for flags in kernels.COMPILE_FLAGS.values())


@pytest.mark.skipif(shutil.which("clang++") is None, reason="clang++ is not installed")
def test_clang_builds_and_runs_openmp_code(tmp_path: Path, tiny_source: Path):
    """clang's OpenMP calls need libomp linked, which GCC's flags do not do."""
    built = build_in_subprocess(tmp_path, "soprano_test_clang", tiny_source, "clang", CXX="clang++")
    assert built.returncode == 0, kernels.first_error(built.stderr)
    assert int(built.stdout) >= 1
