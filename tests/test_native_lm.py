"""The native backend computes what the transformers backend computes, step for step.

Greedy fp32 decoding must give the same tokens and hidden states within 1e-4, alone, in batches
whose sequences end at different steps (so finished rows leave the batch), and through `stream`.
"""

from __future__ import annotations

import logging
from types import ModuleType

import pytest
import torch

import soprano.lm.native as native_module
from soprano.checkpoint import Checkpoint
from soprano.constants import STOP_ID
from soprano.cpu import kernels
from soprano.cpu.linear import HalfStoredLinear, PanelLinear, fbgemm_available, replace_linears
from soprano.lm import SamplingParams, load_language_model
from soprano.lm.base import Generation, LanguageModel, Step
from soprano.lm.native import NativeLM
from soprano.lm.transformers import TransformersLM
from soprano.tokenizer import PromptTokenizer

MAX_TOKENS = 24
SENTENCES = [
    "soprano speaks quickly",
    "the quick brown fox jumps over the lazy dog.",
    "what?",
    "one two three four five six seven eight nine ten, and then some more words here.",
    "it is thirteen past nine.",
    "x",
]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=MAX_TOKENS)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def prompts(prompt_tokenizer: PromptTokenizer) -> list[list[int]]:
    return [prompt_tokenizer.encode(sentence) for sentence in SENTENCES]


@pytest.fixture(scope="module")
def reference(checkpoint: Checkpoint) -> TransformersLM:
    return TransformersLM(checkpoint, CPU)


STORAGES = {
    "compiled": {},
    "half-weights": {"kernels": False},
    "fp32-weights": {"kernels": False, "half_weights": False},
}


@pytest.fixture(scope="module", params=list(STORAGES))
def native(request: pytest.FixtureRequest, checkpoint: Checkpoint) -> NativeLM:
    return NativeLM(checkpoint, CPU, **STORAGES[request.param])


def assert_same_generations(ours: list[Generation], theirs: list[Generation]) -> None:
    assert len(ours) == len(theirs)
    for mine, other in zip(ours, theirs, strict=True):
        assert mine.tokens == other.tokens
        assert mine.finish_reason == other.finish_reason
        torch.testing.assert_close(mine.hidden, other.hidden, atol=1e-4, rtol=0)


def collect(
    lm: LanguageModel, prompts: list[list[int]], params: SamplingParams
) -> list[list[Step]]:
    return list(lm.stream(prompts, params))


def test_auto_picks_native_on_cpu(checkpoint: Checkpoint):
    assert isinstance(load_language_model("auto", checkpoint, CPU, 100), NativeLM)


def linear_kinds(lm: NativeLM) -> set[type]:
    kinds = {type(module) for module in lm.model.modules()}
    return kinds & {PanelLinear, HalfStoredLinear, torch.nn.Linear}


def test_compiled_kernels_are_the_default_on_cpu(
    checkpoint: Checkpoint, compiled_kernels: ModuleType
):
    lm = NativeLM(checkpoint, CPU)
    assert lm.model.compiled is not None
    assert linear_kinds(lm) == {PanelLinear}


def test_half_weights_are_used_where_fbgemm_exists(checkpoint: Checkpoint):
    lm = NativeLM(checkpoint, CPU, kernels=False)
    assert lm.model.compiled is None
    assert linear_kinds(lm) == ({HalfStoredLinear} if fbgemm_available() else {torch.nn.Linear})


def test_single_prompt_matches_transformers(native, reference, prompts):
    prompt = prompts[3]
    (ours,) = native.generate([prompt], GREEDY)
    assert len(ours.tokens) > 1
    assert_same_generations([ours], reference.generate([prompt], GREEDY))


def test_batch_matches_transformers(native, reference, prompts):
    ours = native.generate(prompts, GREEDY)
    # The batch must exercise rows leaving early: different lengths, both finish reasons.
    lengths = [len(generation.tokens) for generation in ours]
    assert len(set(lengths)) >= 3
    assert {g.finish_reason for g in ours} == {"stop", "length"}
    assert len({len(prompt) for prompt in prompts}) == len(prompts)
    assert_same_generations(ours, reference.generate(prompts, GREEDY))


def test_batch_equals_each_prompt_alone(native, prompts):
    together = native.generate(prompts, GREEDY)
    alone = [native.generate([prompt], GREEDY)[0] for prompt in prompts]
    for joint, single in zip(together, alone, strict=True):
        assert joint.tokens == single.tokens
        torch.testing.assert_close(joint.hidden, single.hidden, atol=1e-5, rtol=0)


def test_stream_matches_transformers_step_by_step(native, reference, prompts):
    ours, theirs = collect(native, prompts, GREEDY), collect(reference, prompts, GREEDY)
    assert len(ours) == len(theirs) == MAX_TOKENS
    for mine, other in zip(ours, theirs, strict=True):
        assert [(s.index, s.token, s.last) for s in mine] == [
            (s.index, s.token, s.last) for s in other
        ]
        for my_step, other_step in zip(mine, other, strict=True):
            assert my_step.hidden.dtype == torch.float32
            torch.testing.assert_close(my_step.hidden, other_step.hidden, atol=1e-4, rtol=0)


def test_stream_ends_each_sequence_once(native, prompts):
    ended: set[int] = set()
    for number, steps in enumerate(native.stream(prompts, GREEDY), start=1):
        assert steps, "a step with no active sequence"
        assert [s.index for s in steps] == sorted(set(range(len(prompts))) - ended)
        for step in steps:
            assert step.last == (step.token == STOP_ID or number == MAX_TOKENS)
            if step.last:
                ended.add(step.index)
    assert ended == set(range(len(prompts)))


def test_sampling_matches_transformers(native, reference, prompts):
    params = SamplingParams(
        temperature=0.8, top_p=0.9, repetition_penalty=1.2, seed=7, max_new_tokens=MAX_TOKENS
    )
    assert_same_generations(native.generate(prompts, params), reference.generate(prompts, params))


def test_one_token_and_no_prompts(native, prompts):
    steps = collect(native, prompts, SamplingParams(temperature=0.0, max_new_tokens=1))
    assert len(steps) == 1
    assert [s.index for s in steps[0]] == list(range(len(prompts)))
    assert all(s.last for s in steps[0])
    assert collect(native, [], GREEDY) == []
    with pytest.raises(ValueError, match="at least one token"):
        collect(native, [[]], GREEDY)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_lossy_dtypes_stay_close(checkpoint, reference, prompts, dtype):
    """The lossy options run the same model: the first states agree to within their precision.

    (A wrong computation is off by ~100%; the tiny model's narrow layers quantise coarsely.)
    """
    lossy = NativeLM(checkpoint, CPU, dtype=dtype)
    params = SamplingParams(temperature=0.0, max_new_tokens=1)
    (ours,), (theirs,) = collect(lossy, prompts, params), collect(reference, prompts, params)
    for mine, other in zip(ours, theirs, strict=True):
        error = (mine.hidden - other.hidden).norm() / other.hidden.norm()
        assert error < 0.15


@pytest.mark.skipif(not fbgemm_available(), reason="fp16 weight storage needs FBGEMM (x86)")
def test_half_storage_is_exact_or_refused():
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(64, 96, generator=generator) / 24).bfloat16().float()
    weight[3, :5] = torch.tensor([1e-7, -3e-6, 2.5e-8, 0.0, 1e-5]).bfloat16().float()
    layer = HalfStoredLinear.from_weight(weight)
    x = torch.randn(5, 96, generator=generator)
    torch.testing.assert_close(layer(x), x @ weight.T, atol=1e-6, rtol=1e-6)

    wide = weight.clone()
    wide[0, 0], wide[0, 1] = 1e-30, 1.0
    assert HalfStoredLinear.from_weight(wide) is None
    model = torch.nn.Sequential(torch.nn.Linear(96, 64, bias=False))
    model[0].weight.data = wide
    assert replace_linears(model, HalfStoredLinear.from_weight) == (0, 1)
    assert isinstance(model[0], torch.nn.Linear)


def linear(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight
    return layer


def test_panel_storage_is_exact_or_refused(compiled_kernels: ModuleType):
    kernels = compiled_kernels
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(96, 80, generator=generator) / 24).bfloat16().float()
    other = (torch.randn(64, 96, generator=generator) / 24).bfloat16().float()
    layer, other_layer = PanelLinear.pack_all([linear(weight), linear(other)], kernels)
    for rows in (1, 5, 7, 13):  # row blocks of the GEMM, with and without remainders
        x = torch.randn(2, rows, 80, generator=generator)
        torch.testing.assert_close(layer(x), x @ weight.T, atol=1e-6, rtol=1e-6)
    x = torch.randn(3, 96, generator=generator)
    torch.testing.assert_close(other_layer(x), x @ other.T, atol=1e-6, rtol=1e-6)

    assert PanelLinear.fits(linear(weight), kernels)
    not_bf16 = weight.clone()
    not_bf16[1, 2] += 1e-6
    assert not PanelLinear.fits(linear(not_bf16), kernels)
    assert PanelLinear.fits(linear(not_bf16), kernels, storage=torch.float32)


def test_a_part_panel_is_padded_and_cut_off(compiled_kernels: ModuleType):
    kernels = compiled_kernels
    layer = torch.nn.Linear(80, kernels.PANEL_WIDTH + 8)
    (packed,) = PanelLinear.pack_all([layer], kernels, storage=torch.float32)
    assert packed.panels.shape[0] * kernels.PANEL_WIDTH == 2 * kernels.PANEL_WIDTH
    x = torch.randn(4, 80)
    torch.testing.assert_close(packed(x), layer(x), atol=1e-6, rtol=1e-5)


def test_float32_panels_with_bias_match_linear(compiled_kernels: ModuleType):
    kernels = compiled_kernels
    layer = torch.nn.Linear(80, 96)
    (packed,) = PanelLinear.pack_all([layer], kernels, storage=torch.float32)
    assert packed.panels.dtype == torch.float32
    x = torch.randn(3, 5, 80)
    torch.testing.assert_close(packed(x), layer(x), atol=1e-6, rtol=1e-5)


def test_bf16_products_round_only_the_input(compiled_kernels: ModuleType):
    kernels = compiled_kernels
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(64, 80, generator=generator) / 24).bfloat16().float()
    if not kernels.BF16_PRODUCTS:
        with pytest.raises(RuntimeError, match="AVX512-BF16"):
            PanelLinear.pack_all([linear(weight)], kernels, bf16_products=True)
        return
    (layer,) = PanelLinear.pack_all([linear(weight)], kernels, bf16_products=True)
    assert layer.panels.dtype == torch.int32
    for rows in (1, 9):
        x = torch.randn(rows, 80, generator=generator)
        expected = x.bfloat16().float() @ weight.T
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    assert not PanelLinear.fits(linear(weight[:, :79]), kernels, bf16_products=True)  # odd width


def test_bfloat16_uses_the_kernels_where_the_cpu_has_bf16_products(
    checkpoint: Checkpoint, compiled_kernels: ModuleType
):
    lm = NativeLM(checkpoint, CPU, dtype="bfloat16")
    if compiled_kernels.BF16_PRODUCTS:
        assert lm.model.compiled is not None
        panels = {m.panels.dtype for m in lm.model.modules() if isinstance(m, PanelLinear)}
        assert panels == {torch.int32}
    else:
        assert lm.model.compiled is None
        assert lm.model.norm.dtype == torch.bfloat16


def test_compiled_forward_needs_every_weight_to_fit(
    checkpoint: Checkpoint, compiled_kernels: ModuleType
):
    lm = NativeLM(checkpoint, CPU, kernels=False, half_weights=False)
    lm.model.layers[1].mlp.down_proj.weight.data[0, 0] += 1e-6  # no longer a bf16 value
    assert not lm.model.use_cpu_kernels(compiled_kernels)
    assert lm.model.compiled is None
    assert linear_kinds(lm) == {torch.nn.Linear}


def test_without_a_compiler_the_pytorch_path_runs(
    checkpoint, reference, prompts, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.delenv(kernels.SWITCH, raising=False)
    with caplog.at_level(logging.WARNING, logger="soprano.cpu.kernels"):
        assert kernels.cpu_kernels.__wrapped__() is None
    assert "Could not build the native CPU kernels" in caplog.text

    monkeypatch.setattr(native_module, "cpu_kernels", lambda: None)
    lm = NativeLM(checkpoint, CPU)
    assert lm.model.compiled is None
    assert_same_generations(lm.generate(prompts, GREEDY), reference.generate(prompts, GREEDY))
