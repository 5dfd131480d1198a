"""script/benchmark names the kernel build each column ran, and takes a column's -march target."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from soprano import SopranoTTS
from soprano.cpu import kernels

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
