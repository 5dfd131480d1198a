"""Threads on a busy host: Soprano's OpenMP defaults reach libgomp unless the user chose, the
thread count never changes a bit of the results, and the benchmark's competitors always stop."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import pytest
import torch

from soprano.checkpoint import Checkpoint
from soprano.cpu.kernels import cpu_kernels
from soprano.cpu.linear import PanelLinear
from soprano.cpu.threads import (
    OPENMP_DEFAULTS,
    WAIT_VARIABLES,
    apply_openmp_defaults,
    note_unset_wait_policy,
    share_cores,
)
from soprano.decoder import WindowProduct
from soprano.lm import SamplingParams
from soprano.lm.native import NativeLM
from soprano.tokenizer import PromptTokenizer
from soprano.tts import SopranoTTS

THREAD_COUNTS = (1, 2, 3)
"""3 splits the work unevenly on any machine, and more threads than cores share them."""
ENTRY_MODULES = (
    "soprano",
    "soprano.apps.cli",
    "soprano.apps.http_server",
    "soprano.apps.webui",
    "wyoming_soprano.__main__",
)
SUBPROCESS_TIMEOUT = 120.0
"""Importing torch and a frontend on a loaded machine; it only turns a hang into a failure."""


def test_the_defaults_are_set_where_the_user_set_nothing():
    environ = {"PATH": "/bin"}
    assert apply_openmp_defaults(environ) == OPENMP_DEFAULTS
    assert environ == {"PATH": "/bin", **OPENMP_DEFAULTS}


@pytest.mark.parametrize("name", WAIT_VARIABLES)
def test_a_wait_variable_of_the_user_keeps_both_as_they_are(name: str):
    environ = {name: "12345"}
    assert apply_openmp_defaults(environ) == {}
    assert environ == {name: "12345"}


def test_nothing_is_set_once_torch_is_loaded():
    environ: dict[str, str] = {}
    assert apply_openmp_defaults(environ, torch_loaded=True) == {}
    assert environ == {}


def test_a_process_that_imported_torch_first_is_told_what_to_set(
    caplog: pytest.LogCaptureFixture,
):
    with caplog.at_level(logging.INFO, logger="soprano.cpu.threads"):
        assert note_unset_wait_policy({})
        assert not note_unset_wait_policy({"OMP_WAIT_POLICY": "ACTIVE"})
    [record] = caplog.records
    assert "set OMP_WAIT_POLICY=PASSIVE before importing torch" in record.getMessage()


def libgomp_settings(module: str, **environ: str) -> dict[str, str]:
    """The wait settings libgomp reports (OMP_DISPLAY_ENV) in a process that imports `module`
    and then torch, with `environ` as its only OpenMP variables."""
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}, torch"],
        env={**env, "OMP_DISPLAY_ENV": "VERBOSE", **environ},
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    settings = {}
    for line in result.stderr.splitlines():
        name, _, value = line.strip().partition(" = ")
        if name in WAIT_VARIABLES:
            settings[name] = value.strip("'")
    return settings


@pytest.mark.parametrize("module", ENTRY_MODULES)
def test_every_entry_point_gives_libgomp_the_defaults(module: str):
    assert libgomp_settings(module) == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}


def test_the_benchmark_measures_the_defaults_users_get():
    """tools/benchmark.py (and the load test, which imports it) must import soprano before
    torch, or its columns would run with libgomp's spinning wait instead of Soprano's."""
    tools = Path(__file__).resolve().parent.parent / "tools"
    assert libgomp_settings("benchmark", PYTHONPATH=str(tools)) == {
        "OMP_WAIT_POLICY": "PASSIVE",
        "GOMP_SPINCOUNT": "0",
    }


def test_libgomp_gets_the_users_values():
    assert libgomp_settings("soprano", GOMP_SPINCOUNT="4321")["GOMP_SPINCOUNT"] == "4321"
    assert libgomp_settings("soprano", OMP_WAIT_POLICY="ACTIVE")["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """Puts back torch's thread count and the kernels' (where they are built)."""
    built = cpu_kernels()
    torch_threads = torch.get_num_threads()
    kernel_threads = built.threads() if built is not None else 0
    yield
    torch.set_num_threads(torch_threads)
    if built is not None:
        built.set_threads(kernel_threads)


def test_the_kernels_gemm_is_the_same_for_any_thread_count(
    compiled_kernels: ModuleType, restore_threads: None
):
    """Threads claim runs of panels as they come; which one computes a panel must not matter."""
    generator = torch.Generator().manual_seed(0)
    panels = 37  # runs of panels that do not divide evenly between threads
    weight = torch.randn(panels * compiled_kernels.PANEL_WIDTH, 80, generator=generator)
    layer = torch.nn.Linear(80, weight.shape[0], bias=False)
    layer.weight.data = weight.bfloat16().float()
    (packed,) = PanelLinear.pack_all([layer], compiled_kernels)
    inputs = [torch.randn(rows, 80, generator=generator) for rows in (1, 5, 13)]
    results = {}
    for threads in THREAD_COUNTS:
        compiled_kernels.set_threads(threads)
        results[threads] = [packed(x) for x in inputs]
    for threads in THREAD_COUNTS[1:]:
        for ours, first in zip(results[threads], results[1], strict=True):
            assert torch.equal(ours, first)


@pytest.mark.parametrize("kernel", [1, 3])
def test_a_window_product_is_the_convolution(kernel: int):
    """The decoder's embed conv, as the product the CPU kernels take (PyTorch's convolution
    gave other bits at 2 threads than at 1)."""
    conv = torch.nn.Conv1d(24, 40, kernel)
    x = torch.randn(2, 24, 17)
    frames = WindowProduct(conv)(x.transpose(1, 2))
    torch.testing.assert_close(frames, conv(x).transpose(1, 2), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="plain Conv1d"):
        WindowProduct(torch.nn.Conv1d(24, 24, kernel, groups=24))
    with pytest.raises(ValueError, match="plain Conv1d"):
        WindowProduct(torch.nn.Conv1d(24, 40, kernel, padding=1))


def test_the_kernels_threads_serve_several_callers_at_once(
    compiled_kernels: ModuleType, restore_threads: None
):
    """One loop at a time runs on the kernels' threads; a caller that finds them busy runs its
    own loop alone. Many short loops from several threads must all finish, each exactly."""
    generator = torch.Generator().manual_seed(1)
    layer = torch.nn.Linear(64, 13 * compiled_kernels.PANEL_WIDTH, bias=False)
    layer.weight.data = layer.weight.data.bfloat16().float()
    (packed,) = PanelLinear.pack_all([layer], compiled_kernels)
    x = torch.randn(3, 64, generator=generator)
    compiled_kernels.set_threads(1)
    expected = packed(x)
    compiled_kernels.set_threads(3)

    def loops(_: int) -> bool:
        return all(torch.equal(packed(x), expected) for _ in range(300))

    with ThreadPoolExecutor(max_workers=4) as callers:
        assert all(callers.map(loops, range(4)))


def test_the_audio_is_the_same_for_any_thread_count(tiny_checkpoint: Path, restore_threads: None):
    """`threads` is a speed setting only: the LM's states and the audio keep every bit."""
    text = "The quick brown fox jumps over the lazy dog. It runs all the way back home."
    checkpoint = Checkpoint.from_folder(tiny_checkpoint)
    prompts = [PromptTokenizer(checkpoint.tokenizer_path).encode(text)] * 3
    params = SamplingParams(max_new_tokens=24)
    hidden, audio, streamed = {}, {}, {}
    for threads in THREAD_COUNTS:
        lm = NativeLM(checkpoint, torch.device("cpu"), threads=threads)
        hidden[threads] = [g.hidden for g in lm.generate(prompts, params)]
        tts = SopranoTTS(
            "native", "cpu", model_path=tiny_checkpoint, backend_options={"threads": threads}
        )
        audio[threads] = tts.infer(text, max_new_tokens=24)
        streamed[threads] = torch.cat(list(tts.infer_stream(text, max_new_tokens=24)))
    for threads in THREAD_COUNTS[1:]:
        assert all(torch.equal(a, b) for a, b in zip(hidden[threads], hidden[1], strict=True))
        assert torch.equal(audio[threads], audio[1])
        assert torch.equal(streamed[threads], streamed[1])


def test_the_kernels_take_the_threads_and_torch_keeps_one(
    compiled_kernels: ModuleType, checkpoint: Checkpoint, restore_threads: None
):
    """PyTorch's operators between the kernels' loops run on the calling thread, so that two
    teams of threads do not take turns on the same cores; None keeps the count chosen before."""
    NativeLM(checkpoint, torch.device("cpu"), threads=3)
    assert (compiled_kernels.threads(), torch.get_num_threads()) == (3, 1)
    NativeLM(checkpoint, torch.device("cpu"))
    assert (compiled_kernels.threads(), torch.get_num_threads()) == (3, 1)
    assert share_cores(compiled_kernels, 2) == 2
    assert (compiled_kernels.threads(), torch.get_num_threads()) == (2, 1)


def test_the_pytorch_path_gives_torch_the_threads(checkpoint: Checkpoint, restore_threads: None):
    NativeLM(checkpoint, torch.device("cpu"), kernels=False, threads=3)
    assert torch.get_num_threads() == 3


def test_openmp_loops_run_on_torchs_threads(compiled_kernels: ModuleType, tiny_checkpoint: Path):
    """SOPRANO_OPENMP_LOOPS puts the kernels' loops on OpenMP's threads, which torch counts."""
    script = (
        "import sys, torch\n"
        "from soprano.checkpoint import Checkpoint\n"
        "from soprano.cpu.kernels import cpu_kernels\n"
        "from soprano.lm.native import NativeLM\n"
        "NativeLM(Checkpoint.from_folder(sys.argv[1]), torch.device('cpu'), threads=3)\n"
        "print(cpu_kernels().OPENMP_LOOPS, cpu_kernels().threads(), torch.get_num_threads())\n"
    )
    environment = os.environ | {"SOPRANO_OPENMP_LOOPS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tiny_checkpoint)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "3", "3"]
