"""dtype 'int8': weight-only int8 with a scale per output channel, fp32 arithmetic.

The kernels' int8 panels must compute x times the dequantised weights (to fp32 rounding), row by
row whatever else the batch holds (the serving layer's exactness rests on it), and the PyTorch
path must compute the same model to rounding.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch

from soprano import SopranoTTS
from soprano.checkpoint import Checkpoint
from soprano.cpu.linear import (
    INT8_LIMIT,
    HalfStoredLinear,
    PanelLinear,
    dequantized_int8,
    fbgemm_available,
    linears_below,
    quantize_int8,
)
from soprano.decoder import WindowProduct
from soprano.lm import SamplingParams
from soprano.lm.native import NativeLM
from soprano.tokenizer import PromptTokenizer

CPU = torch.device("cpu")
SENTENCES = ["the quick brown fox jumps over the lazy dog.", "what?", "it is thirteen past nine."]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def prompts(prompt_tokenizer: PromptTokenizer) -> list[list[int]]:
    return [prompt_tokenizer.encode(sentence) for sentence in SENTENCES]


def random_weight(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)) / 24


def linear(weight: torch.Tensor, bias: bool = False) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    layer.weight.data = weight
    return layer


def test_quantisation_is_per_row_symmetric_and_within_half_a_step():
    weight = random_weight(40, 70)
    weight[5] = 0.0
    weight[6] *= 1000  # one loud row must not coarsen the others
    quantized, scales = quantize_int8(weight)
    assert quantized.dtype == torch.int8 and scales.dtype == torch.float32
    assert scales.shape == (40,)
    assert quantized[5].eq(0).all() and scales[5] == 1
    loud = [row for row in range(40) if row != 5]
    assert quantized[loud].abs().amax(dim=1).eq(INT8_LIMIT).all(), "nothing clipped or wasted"
    assert quantized.abs().max() <= INT8_LIMIT
    error = (dequantized_int8(weight) - weight).abs()
    assert (error <= scales[:, None] / 2 * (1 + 1e-6)).all()
    torch.testing.assert_close(scales[6] / scales[7], weight[6].abs().max() / weight[7].abs().max())


@pytest.mark.parametrize(("rows", "columns"), [(96, 80), (64, 512), (40, 33)])
def test_int8_panels_multiply_by_the_dequantised_weights(
    compiled_kernels: ModuleType, rows: int, columns: int
):
    weight = random_weight(rows, columns)
    layer = linear(weight, bias=True)
    (packed,) = PanelLinear.pack_all([layer], compiled_kernels, storage=torch.int8)
    assert packed.panels.dtype == torch.int8
    expected_weight = dequantized_int8(weight)
    for batch in (1, 5, 7, 13):  # row blocks of the GEMM, with and without remainders
        x = torch.randn(batch, columns)
        expected = x.double() @ expected_weight.double().T + layer.bias.double()
        torch.testing.assert_close(packed(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_int8_halves_the_bytes_of_bf16(compiled_kernels: ModuleType):
    weight = random_weight(4 * compiled_kernels.PANEL_WIDTH, 512).bfloat16().float()
    (int8,) = PanelLinear.pack_all([linear(weight)], compiled_kernels, storage=torch.int8)
    (bf16,) = PanelLinear.pack_all([linear(weight)], compiled_kernels)
    int8_bytes = int8.panels.numel() * int8.panels.element_size()
    bf16_bytes = bf16.panels.numel() * bf16.panels.element_size()
    scale_bytes = 4 * len(weight)
    assert int8_bytes == bf16_bytes // 2 + scale_bytes


STORAGES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


@pytest.mark.parametrize("storage", [*STORAGES, "bf16 products"])
def test_every_panel_kind_gives_a_row_the_same_bits_in_any_batch(
    compiled_kernels: ModuleType, storage: str
):
    """Continuous batching is exact because a row's product never depends on its batch."""
    products = storage == "bf16 products"
    if products and not compiled_kernels.BF16_PRODUCTS:
        pytest.skip("this CPU has no bf16 dot product")
    weight = random_weight(3 * compiled_kernels.PANEL_WIDTH, 96).bfloat16().float()
    dtype = torch.bfloat16 if products else STORAGES[storage]
    (layer,) = PanelLinear.pack_all([linear(weight)], compiled_kernels, dtype, products)
    x = torch.randn(19, 96)
    together = layer(x)
    for start, stop in [(0, 1), (3, 4), (0, 8), (2, 11), (5, 19), (18, 19)]:
        assert torch.equal(layer(x[start:stop]), together[start:stop]), (start, stop)


def test_int8_puts_every_projection_and_the_head_on_int8_panels(
    checkpoint: Checkpoint, compiled_kernels: ModuleType
):
    lm = NativeLM(checkpoint, CPU, dtype="int8")
    assert lm.model.compiled is not None
    panels = [module for module in lm.model.modules() if isinstance(module, PanelLinear)]
    assert len(panels) == 4 * len(lm.model.blocks()) + 1
    assert {layer.panels.dtype for layer in panels} == {torch.int8}
    assert not [m for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]


def test_int8_batch_equals_each_prompt_alone_bit_for_bit(
    checkpoint: Checkpoint, compiled_kernels: ModuleType, prompts: list[list[int]]
):
    lm = NativeLM(checkpoint, CPU, dtype="int8")
    together = lm.generate(prompts, GREEDY)
    for prompt, joint in zip(prompts, together, strict=True):
        (alone,) = lm.generate([prompt], GREEDY)
        assert joint.tokens == alone.tokens
        assert torch.equal(joint.hidden, alone.hidden)


FALLBACKS = {
    "fp16-stored int8": {"kernels": False},
    "dequantised": {"kernels": False, "half_weights": False},
}


@pytest.mark.parametrize("fallback", list(FALLBACKS))
def test_the_pytorch_path_computes_the_same_int8_model(
    checkpoint: Checkpoint,
    compiled_kernels: ModuleType,
    prompts: list[list[int]],
    fallback: str,
):
    options = FALLBACKS[fallback]
    if fallback == "fp16-stored int8" and not fbgemm_available():
        pytest.skip("fp16 weight storage needs FBGEMM (x86)")
    pytorch = NativeLM(checkpoint, CPU, dtype="int8", **options)
    assert pytorch.model.compiled is None
    kinds = {type(module) for module in pytorch.model.modules()}
    expected = HalfStoredLinear if fallback == "fp16-stored int8" else torch.nn.Linear
    assert expected in kinds and PanelLinear not in kinds
    assert HalfStoredLinear not in kinds or torch.nn.Linear not in kinds
    compiled = NativeLM(checkpoint, CPU, dtype="int8")
    for ours, theirs in zip(
        pytorch.generate(prompts, GREEDY), compiled.generate(prompts, GREEDY), strict=True
    ):
        assert ours.tokens == theirs.tokens
        torch.testing.assert_close(ours.hidden, theirs.hidden, atol=1e-4, rtol=0)


def test_the_pytorch_path_quantises_even_without_fbgemm(checkpoint: Checkpoint):
    """Where int8 has no storage of its own (no kernels, no FBGEMM, a GPU) the fp32 weights are
    replaced by their int8 values."""
    exact = NativeLM(checkpoint, CPU, kernels=False, half_weights=False)
    lossy = NativeLM(checkpoint, CPU, dtype="int8", kernels=False, half_weights=False)
    for exact_block, lossy_block in zip(exact.model.blocks(), lossy.model.blocks(), strict=True):
        weight = exact_block.mlp.down_proj.weight
        assert torch.equal(lossy_block.mlp.down_proj.weight, dequantized_int8(weight))
    head = exact.model.lm_head.weight
    assert torch.equal(lossy.model.lm_head.weight, dequantized_int8(head))


def test_the_decoder_holds_the_same_int8_weights_on_every_path(
    tiny_checkpoint: Path, compiled_kernels: ModuleType
):
    def engine(**options: object) -> SopranoTTS:
        return SopranoTTS(
            device="cpu", model_path=tiny_checkpoint, warmup=False, backend_options=options
        )

    compiled, pytorch, exact = engine(dtype="int8"), engine(dtype="int8", kernels=False), engine()
    embed = compiled.decoder.decoder.embed
    assert isinstance(embed, WindowProduct) and embed.linear.panels.dtype == torch.float32
    panels = {
        m.panels.dtype
        for m in compiled.decoder.modules()
        if isinstance(m, PanelLinear) and m is not embed.linear
    }
    assert panels == {torch.int8}
    exact_pytorch = engine(kernels=False)
    for (_, _, mine), (_, _, theirs) in zip(
        linears_below(pytorch.decoder), linears_below(exact_pytorch.decoder), strict=True
    ):
        assert torch.equal(mine.weight, dequantized_int8(theirs.weight))
    frames = torch.randn(12, compiled.decoder.input_channels)
    (on_kernels,), (on_pytorch,) = (
        compiled.decoder.decode([frames]),
        pytorch.decoder.decode([frames]),
    )
    torch.testing.assert_close(on_kernels, on_pytorch, atol=1e-5, rtol=0)
    (reference,) = exact.decoder.decode([frames])
    assert 0 < (on_kernels - reference).norm() / reference.norm() < 0.05
