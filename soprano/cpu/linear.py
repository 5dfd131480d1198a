"""How the native backend stores its weight matrices and multiplies by them.

At one to a few sequences a decode step is a matrix-vector product per weight matrix, so its speed
is the speed of streaming the weights from memory. The storages:

- `PanelLinear` (the exact default on CPUs where the native kernels build): the checkpoint's bf16
  weights as they are, in panels for our own GEMM (soprano/cpu/csrc), which widens them to fp32
  (exactly) and multiplies and sums in fp32. Half the memory traffic of fp32 weights, and the
  storage the compiled forward reads. With bf16 products (lossy) it also rounds x to bf16. The
  decoder's fp32 weights use it too, as fp32 panels. With int8 storage (lossy, weight-only) each
  weight row is rounded to int8 times one fp32 scale (`quantize_int8`): a quarter of the bytes of
  fp32 and half of bf16, multiplied and summed in fp32, the scale applied once per output.
- `HalfStoredLinear` (the exact fallback on x86 CPUs): the checkpoint's weights are bf16, so each
  row, scaled by a power of two, fits fp16 exactly. FBGEMM's fp16 GEMM multiplies fp32
  activations by those weights with fp32 products and sums, then we undo the scale (exact for a
  power of two). The result is fp32 arithmetic on the checkpoint's values, at half the memory
  traffic of fp32 weights. A matrix that does not fit fp16 exactly keeps fp32 storage.
  The int8 fallback holds the int8 weights the same way (integers up to 127 are exact in fp16)
  with their scales: the kernels' arithmetic, up to the order of the sums.
- plain `nn.Linear` in fp32 or bf16 (bf16 is the lossy option for GPUs), or with the int8
  weights dequantised to fp32 (`dequantized_int8`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType

import torch
from torch import Tensor, nn

HALF_MAX_EXPONENT = 14
"""Rows are scaled so that their largest magnitude lies in [2^14, 2^15), inside fp16's range."""
INT8_LIMIT = 127
"""int8 weights lie in [-127, 127]: symmetric about 0, so a row and its negation round alike."""


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output channel: row i is about q[i] · scales[i] (fp32), within half a
    scale. A row's scale is its largest magnitude / 127, so nothing is clipped; a row of zeros
    gets scale 1 (and zeros)."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1) / INT8_LIMIT
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    quantized = torch.round(weight / scales[:, None]).clamp(-INT8_LIMIT, INT8_LIMIT)
    return quantized.to(torch.int8), scales


def dequantized_int8(weight: Tensor) -> Tensor:
    """The fp32 values that int8 storage gives `weight`."""
    quantized, scales = quantize_int8(weight)
    return quantized.float() * scales[:, None]


def fbgemm_available() -> bool:
    """FBGEMM's packed kernels exist on x86 builds of PyTorch, not on ARM or macOS."""
    return "fbgemm" in torch.backends.quantized.supported_engines


class PanelLinear(nn.Module):
    """y = x · Wᵀ + b by the native CPU kernels, W held in panels of bf16 (the LM's weights,
    exactly), float32, or int8 with a scale per output (lossy). Products are fp32, or with
    `bf16_products` (lossy, CPUs with AVX512-BF16) x is rounded to bf16 for twice the
    throughput."""

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

        Weights are padded with zero rows to whole panels; `forward` drops those columns. int8
        panels also hold their rows' scales, in INT8_SCALE_ROWS extra rows of bytes.
        """
        weights = [_pad_rows(layer.weight.detach(), kernels.PANEL_WIDTH) for layer in layers]
        extra = kernels.INT8_SCALE_ROWS if storage == torch.int8 else 0
        sizes = [len(weight) * (weight.shape[1] + extra) for weight in weights]
        buffer = kernels.empty_panels(sum(sizes), storage)
        packed, offset = [], 0
        for layer, weight, size in zip(layers, weights, sizes, strict=True):
            out = buffer[offset : offset + size]
            if storage == torch.int8:
                panels = kernels.pack_int8(*quantize_int8(weight), out)
            else:
                panels = kernels.pack(weight.to(storage), out, bf16_products)
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
    """y = x · Wᵀ in fp32 arithmetic, with W held as exactly-representable fp16 (FBGEMM) and a
    factor per output (`output_scale`) applied after the sums."""

    def __init__(self, packed: object, output_scale: Tensor | None) -> None:
        super().__init__()
        self.packed = packed
        self.output_scale = output_scale

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

    @classmethod
    def from_int8(cls, weight: Tensor) -> HalfStoredLinear:
        """`weight` rounded to int8 (`quantize_int8`), held as fp16 (exact for integers up to
        127) with its scales: fp32 sums of x times the int8 weights, scaled once per output,
        as the kernels' int8 panels compute."""
        quantized, scales = quantize_int8(weight)
        return cls(torch.ops.quantized.linear_prepack_fp16(quantized.float(), None), scales)

    def scaled(self, x: Tensor) -> Tensor:
        """x · Wᵀ before the factor per output; `forward` applies it."""
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)

    def forward(self, x: Tensor) -> Tensor:
        y = self.scaled(x)
        return y if self.output_scale is None else y * self.output_scale


def add_projection(residual: Tensor, layer: nn.Module, x: Tensor) -> Tensor:
    """residual + layer(x); for fp16-stored rows the factor per output rides on the add (one
    kernel). For the exact rows it is a power of two, so addcmul gives the same bits as
    mul-then-add."""
    if isinstance(layer, HalfStoredLinear) and layer.output_scale is not None:
        return torch.addcmul(residual, layer.scaled(x), layer.output_scale)
    return residual + layer(x)


def round_to_int8(module: nn.Module) -> int:
    """Replace the weights of the nn.Linears below `module` by their int8 values, dequantised
    (`dequantized_int8`): the int8 arithmetic for paths without int8 storage. Returns how many."""
    linears = linears_below(module)
    with torch.no_grad():
        for _, _, layer in linears:
            layer.weight.copy_(dequantized_int8(layer.weight))
    return len(linears)


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
