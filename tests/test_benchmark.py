"""script/benchmark names the kernel build each column ran, and takes a column's -march target."""

from __future__ import annotations

import importlib.util
import signal
import sys
from pathlib import Path
from types import ModuleType

import pytest

from soprano import SopranoTTS
from soprano.cpu import kernels

COMPETITOR_TIMEOUT = 120.0
"""Seconds a competitor may take to end by itself on a loaded machine: a hang fails."""
TOOL = Path(__file__).resolve().parent.parent / "tools" / "benchmark.py"


@pytest.fixture(scope="module")
def benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_tool", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_column_takes_options_and_a_target(benchmark: ModuleType):
    name, options = benchmark.parse_backend("native:dtype=int8;threads=1;march=haswell")
    assert (name, options) == ("native", {"dtype": "int8", "threads": 1, "march": "haswell"})
    with pytest.raises(SystemExit):
        benchmark.main(["--backends", "transformers:dtype=int8", "--repeats", "1"])


def test_the_kernel_build_is_named_per_column(
    benchmark: ModuleType, tiny_checkpoint: Path, compiled_kernels: ModuleType
):
    compiled = SopranoTTS(device="cpu", model_path=tiny_checkpoint, warmup=False)
    described = kernels.describe(kernels.build_info(compiled_kernels))
    assert benchmark.kernel_build(compiled) == f"{described} (LM and decoder)"
    pytorch_lm = SopranoTTS(
        device="cpu",
        model_path=tiny_checkpoint,
        warmup=False,
        backend_options={"kernels": False},
    )
    assert benchmark.kernel_build(pytorch_lm) == f"{described} (decoder)"

    report = {
        "backends": ["native", "native:march=haswell"],
        "kernels": {"native": "AVX-512 (...)", "native:march=haswell": "AVX2 (...)"},
        "medians": {"native": {"x": 1.0}, "native:march=haswell": {"x": 2.0}},
        "settings": {"device": "cpu", "repeats": 1, "lm_tokens": 8, "sentence_tokens": 8},
        "machine": {
            "cpu": "a CPU",
            "cores": 2,
            "torch": "2",
            "threads": 2,
            "cuda": None,
            "load_before": 0.0,
            "load_after": 0.0,
        },
        "command": "script/benchmark",
    }
    lines = benchmark.table(report).splitlines()
    assert lines[-3:] == [
        "Kernels:",
        "- native: AVX-512 (...)",
        "- native:march=haswell: AVX2 (...)",
    ]


def test_the_benchmarks_competitors_run_and_are_always_stopped(benchmark: ModuleType):
    with pytest.raises(RuntimeError, match="a task failed"), benchmark.competitors(2) as running:
        assert len(running) == 2
        assert all(process.poll() is None for process in running)
        raise RuntimeError("a task failed")
    assert [process.returncode for process in running] == [-signal.SIGKILL] * 2
    with benchmark.competitors(0) as none:
        assert none == []


def test_a_competitor_ends_by_itself_after_its_lifetime(benchmark: ModuleType):
    """Should the benchmark itself be killed, no busy loop outlives its bound."""
    with benchmark.competitors(1, lifetime=0.1) as (process,):
        assert process.wait(timeout=COMPETITOR_TIMEOUT) == 0
