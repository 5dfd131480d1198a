"""Shared fixtures: random-weight checkpoints in the published layout, made once per session."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from soprano.checkpoint import Checkpoint
from soprano.cpu import kernels
from soprano.testing.make_checkpoint import make_checkpoint
from soprano.tokenizer import PromptTokenizer


@pytest.fixture(scope="session")
def compiled_kernels() -> ModuleType:
    """The native CPU kernels. Skips where they are not expected (no compiler, SOPRANO_KERNELS=off,
    not Linux: script/test-no-kernels runs so) and fails where they should have built."""
    module = kernels.cpu_kernels()
    if module is None:
        reason = kernels.unavailable_reason()
        if reason is not None:
            pytest.skip(f"no native CPU kernels here: {reason}")
        pytest.fail("the native CPU kernels did not build")
    return module


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Soprano-1.1-style checkpoint (decoder 1×1 embed)."""
    return make_checkpoint(tmp_path_factory.mktemp("soprano-tiny"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def checkpoint(tiny_checkpoint: Path) -> Checkpoint:
    """The tiny checkpoint, loaded: for the LM backends, which take a Checkpoint."""
    return Checkpoint.from_folder(tiny_checkpoint)


@pytest.fixture(scope="session")
def prompt_tokenizer(checkpoint: Checkpoint) -> PromptTokenizer:
    return PromptTokenizer(checkpoint.tokenizer_path)


@pytest.fixture(scope="session")
def tiny_checkpoint_80m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Soprano-80M-style checkpoint (decoder kernel-3 embed)."""
    return make_checkpoint(
        tmp_path_factory.mktemp("soprano-tiny-80m"), size="tiny", decoder="80m", seed=1
    )


@pytest.fixture(scope="session")
def endless_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint that never says [STOP]: every sentence runs to max_new_tokens.

    For tests that need a generation of a known, long length (a busy server, exact lengths).
    """
    return make_checkpoint(
        tmp_path_factory.mktemp("soprano-endless"), size="tiny", seed=2, stop_scale=0.0
    )


@pytest.fixture(scope="session")
def voice_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder holding one checkpoint folder, `second`: a voice that servers find there
    (a different checkpoint from every other fixture's, so its audio differs)."""
    data_dir = tmp_path_factory.mktemp("voices")
    make_checkpoint(data_dir / "second", size="tiny", decoder="80m", seed=4)
    return data_dir
