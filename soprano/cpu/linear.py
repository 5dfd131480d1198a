"""How the native backend stores its weight matrices and multiplies by them.

At one to a few sequences a decode step is a matrix-vector product per weight matrix, so its speed
is the speed of streaming the weights from memory. Four storages:

- `PanelLinear` (the exact default on CPUs where the native kernels build): the checkpoint's bf16
  weights as they are, in panels for our own GEMM (soprano/cpu/csrc), which widens them to fp32
  (exactly) and multiplies and sums in fp32. Half the memory traffic of fp32 weights, and the
  storage the compiled forward reads. With bf16 products (lossy) it also rounds x to bf16. The
  decoder's fp32 weights use it too, as fp32 panels.
- `HalfStoredLinear` (the exact fallback on x86 CPUs): the checkpoint's weights are bf16, so each
  row, scaled by a power of two, fits fp16 exactly. FBGEMM's fp16 GEMM multiplies fp32
  activations by those weights with fp32 products and sums, then we undo the scale (exact for a
  power of two). The result is fp32 arithmetic on the checkpoint's values, at half the memory
  traffic of fp32 weights. A matrix that does not fit fp16 exactly keeps fp32 storage.
- `DynamicInt8Linear` (lossy option): int8 weights per output channel, activations quantised
  per call (FBGEMM), at a measured accuracy cost (README, "Performance").
- plain `nn.Linear` in fp32 or bf16 (bf16 is the lossy option for GPUs).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType

import torch
from torch import Tensor, nn

HALF_MAX_EXPONENT = 14
"""Rows are scaled so that their largest magnitude lies in [2^14, 2^15), inside fp16's range."""


def fbgemm_available() -> bool:
    """FBGEMM's packed kernels exist on x86 builds of PyTorch, not on ARM or macOS."""
    return "fbgemm" in torch.backends.quantized.supported_engines


class PanelLinear(nn.Module):
    """y = x · Wᵀ + b by the native CPU kernels, W held in panels of bf16 (the LM's weights,
    exactly) or float32. Products are fp32, or with `bf16_products` (lossy, CPUs with
    AVX512-BF16) x is rounded to bf16 for twice the throughput."""

    def __init__(
        self, panels: Tensor, bias: Tensor | None, out_features: int, kernels: ModuleType
    ) -> None:
        super().__init__()
        self.panels = panels
        self.bias = bias
        self.out_features = out_features
        """The panels' columns past it are zero padding."""
        self.kernels = kernels

    @staticmethod
    def fits(
        layer: nn.Linear,
        kernels: ModuleType,
        storage: torch.dtype = torch.bfloat16,
        bf16_products: bool = False,
        rounded: bool = False,
    ) -> bool:
        """Whether `storage` holds `layer`'s weight exactly, or at all when it may be `rounded`
        (and, for bf16 products, whether its input width is even)."""
        weight = layer.weight.detach()
        if bf16_products and weight.shape[1] % 2:
            return False
        return rounded or torch.equal(weight.to(storage).to(weight.dtype), weight)

    @classmethod
    def pack_all(
        cls,
        layers: Sequence[nn.Linear],
        kernels: ModuleType,
        storage: torch.dtype = torch.bfloat16,
        bf16_products: bool = False,
    ) -> list[PanelLinear]:
        """The layers (each must fit) in one buffer, on huge pages where the OS offers them.

        Weights are padded with zero rows to whole panels; `forward` drops those columns.
        """
        weights = [_pad_rows(layer.weight.detach(), kernels.PANEL_WIDTH) for layer in layers]
        buffer = kernels.empty_panels(sum(weight.numel() for weight in weights), storage)
        packed, offset = [], 0
        for layer, weight in zip(layers, weights, strict=True):
            size = weight.numel()
            panels = kernels.pack(weight.to(storage), buffer[offset : offset + size], bf16_products)
            bias = None if layer.bias is None else layer.bias.detach().float()
            packed.append(cls(panels, bias, layer.out_features, kernels))
            offset += size
        return packed

    def forward(self, x: Tensor) -> Tensor:
        y = self.kernels.linear(x.reshape(-1, x.shape[-1]), self.panels)[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def _pad_rows(weight: Tensor, multiple: int) -> Tensor:
    missing = -len(weight) % multiple
    return torch.cat([weight, weight.new_zeros(missing, weight.shape[1])]) if missing else weight


def linears_below(module: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """Every nn.Linear below `module`, with the parent and attribute name that hold it."""
    return [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]


def use_panels(
    module: nn.Module,
    kernels: ModuleType,
    storage: torch.dtype,
    bf16_products: bool = False,
    *,
    all_or_none: bool = False,
    rounded: bool = False,
) -> int:
    """Move the nn.Linears below `module` that fit onto `storage` panels; return how many.

    With `all_or_none`, move none unless every one fits. With `rounded` (lossy) a weight that
    `storage` cannot hold exactly is rounded to it instead of being left out.
    """
    linears = linears_below(module)
    fitting = [
        (parent, name, child)
        for parent, name, child in linears
        if PanelLinear.fits(child, kernels, storage, bf16_products, rounded)
    ]
    if all_or_none and len(fitting) < len(linears):
        return 0
    packed = PanelLinear.pack_all(
        [child for _, _, child in fitting], kernels, storage, bf16_products
    )
    for (parent, name, _), layer in zip(fitting, packed, strict=True):
        setattr(parent, name, layer)
    return len(packed)


class HalfStoredLinear(nn.Module):
    """y = x · Wᵀ in fp32 arithmetic, with W held as exactly-representable fp16 (FBGEMM)."""

    def __init__(self, packed: object, inverse_scale: Tensor | None) -> None:
        super().__init__()
        self.packed = packed
        self.inverse_scale = inverse_scale

    @classmethod
    def from_weight(cls, weight: Tensor) -> HalfStoredLinear | None:
        """Pack `weight` [out, in]; None when some value would not survive fp16 exactly."""
        weight = weight.detach().float()
        largest = weight.abs().amax(dim=1)
        exponent = torch.where(largest > 0, torch.floor(torch.log2(largest)), 0)
        scale = torch.exp2(HALF_MAX_EXPONENT - exponent)
        scaled = weight * scale[:, None]
        packed = torch.ops.quantized.linear_prepack_fp16(scaled, None)
        unpacked, _ = torch.ops.quantized.linear_unpack_fp16(packed)
        if not torch.equal(unpacked, scaled):
            return None
        return cls(packed, None if bool((scale == 1).all()) else 1.0 / scale)

    def scaled(self, x: Tensor) -> Tensor:
        """x · Wᵀ times the rows' scales (exact powers of two); `forward` undoes them."""
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)

    def forward(self, x: Tensor) -> Tensor:
        y = self.scaled(x)
        return y if self.inverse_scale is None else y * self.inverse_scale


def add_projection(residual: Tensor, layer: nn.Module, x: Tensor) -> Tensor:
    """residual + layer(x); for fp16-stored rows the unscaling rides on the add (one kernel).

    Multiplying by a power of two is exact, so addcmul gives the same bits as mul-then-add.
    """
    if isinstance(layer, HalfStoredLinear) and layer.inverse_scale is not None:
        return torch.addcmul(residual, layer.scaled(x), layer.inverse_scale)
    return residual + layer(x)


@functools.cache
def has_vnni() -> bool:
    """Whether the CPU sums u8×s8 products in 32 bits (VNNI); without it FBGEMM's 16-bit pair
    sums can saturate unless activations keep to 7 bits."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


class DynamicInt8Linear(nn.Module):
    """int8 weights (symmetric, per output channel) × activations quantised on the fly."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.reduce_range = not has_vnni()
        weight = weight.detach().float()
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        with warnings.catch_warnings():
            # PyTorch marks quantized tensors as deprecated; FBGEMM's int8 GEMM still needs one
            # to pack its weights, and the packed form is all we keep.
            warnings.simplefilter("ignore")
            quantized = torch.quantize_per_channel(
                weight, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8
            )
            self.packed = torch.ops.quantized.linear_prepack(quantized, None)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)


def replace_linears(
    module: nn.Module, storage: Callable[[Tensor], nn.Module | None]
) -> tuple[int, int]:
    """Swap each nn.Linear below `module` for `storage(weight)`, keeping those it refuses (None).

    Returns how many were replaced and how many kept.
    """
    replaced = kept = 0
    for parent, name, child in linears_below(module):
        replacement = storage(child.weight)
        if replacement is None:
            kept += 1
        else:
            replaced += 1
            setattr(parent, name, replacement)
    return replaced, kept
