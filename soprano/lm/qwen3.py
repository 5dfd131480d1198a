"""A small Qwen3 causal LM in plain PyTorch, shaped for step-by-step batched decoding.

Same arithmetic as Hugging Face's Qwen3ForCausalLM (pre-norm blocks, per-head RMSNorm on queries
and keys, rotate-half RoPE, grouped-query attention, SwiGLU MLP), with fewer and larger kernels:
q/k/v and gate/up are fused into one matmul each. A forward takes a ragged batch: the new tokens
of any number of sequences, each with a KV cache of its own, so sequences can join a running
batch (their prompt is one more run of tokens in the next call) and leave it at any step.

On CPUs, `use_cpu_kernels` hands the forward to the compiled kernels of soprano/cpu/csrc, which do
the same arithmetic without a kernel launch per small operation.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soprano.checkpoint import LMConfig
from soprano.cpu.linear import PanelLinear, add_projection, use_panels


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Qwen3's RMSNorm over the last dimension, computed in float32."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def head_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of each head ([..., heads, head_dim]) with a weight row per head."""
    return (F.rms_norm(x.float(), (x.shape[-1],), eps=eps) * weight.float()).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half RoPE, with the sign of the rotation folded into sin.

    rotate_half(x) · sin == roll(x, hd/2) · signed_sin, which saves a negation and a concat.
    """

    cos: Tensor
    signed_sin: Tensor

    def __init__(self, head_dim: int, theta: float, length: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("cos", torch.empty(0, head_dim), persistent=False)
        self.register_buffer("signed_sin", torch.empty(0, head_dim), persistent=False)
        self.reserve(length)

    def reserve(self, length: int) -> None:
        """Make the tables cover positions 0 … length−1 (computed in float32, as HF does)."""
        if length <= len(self.cos):
            return
        device = self.cos.device
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / self.theta ** (exponents / self.head_dim)
        positions = torch.arange(length, dtype=torch.float32, device=device)
        freqs = positions[:, None] * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        half = self.head_dim // 2
        sin = angles.sin()
        self.cos = angles.cos()
        self.signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class SequenceCache:
    """Keys and values of one sequence in every layer, for up to `capacity` positions.

    Position p of the sequence is slot p of the cache: there is no padding, so a sequence's
    attention reads exactly its own positions whatever batch it is computed in.
    """

    def __init__(
        self, config: LMConfig, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (config.num_hidden_layers, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0
        self.capacity = capacity


class Attention(nn.Module):
    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.eps = config.rms_norm_eps
        width = (self.heads + 2 * self.kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)
        self.qk_norm = nn.Parameter(torch.ones(self.heads + self.kv_heads, self.head_dim))
        """q_norm's weight for the query heads, then k_norm's for the key heads."""

    def forward(
        self,
        residual: Tensor,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        layer: int,
        caches: Sequence[SequenceCache],
        counts: Sequence[int],
    ) -> Tensor:
        """residual + attention(x) for [N, hidden] rows: `counts[i]` new tokens of `caches[i]`,
        one sequence after the other, whose keys and values are appended to that cache."""
        rows = x.shape[0]
        qk_heads = self.heads + self.kv_heads
        groups = self.heads // self.kv_heads
        qkv = self.qkv_proj(x).view(rows, qk_heads + self.kv_heads, self.head_dim)
        qk = apply_rotary(head_rms_norm(qkv[:, :qk_heads], self.qk_norm, self.eps), *rope)
        outputs = []
        first = 0
        for cache, count in zip(caches, counts, strict=True):
            start, end = cache.length, cache.length + count
            keys, values = cache.keys[layer], cache.values[layer]
            keys[:, start:end] = qk[first : first + count, self.heads :].transpose(0, 1)
            values[:, start:end] = qkv[first : first + count, qk_heads:].transpose(0, 1)
            # Each key head serves `groups` query heads: fold those into the query length, so
            # one key head attends for all of them without repeating the cache.
            query = qk[first : first + count, : self.heads].view(
                count, self.kv_heads, groups, self.head_dim
            )
            query = query.permute(1, 2, 0, 3).reshape(self.kv_heads, groups * count, self.head_dim)
            mask = None
            if count > 1:
                query_at = torch.arange(start, end, device=x.device).repeat(groups)[:, None]
                mask = torch.arange(end, device=x.device) <= query_at
            out = F.scaled_dot_product_attention(
                query, keys[:, :end], values[:, :end], attn_mask=mask
            )
            out = out.view(self.kv_heads, groups, count, self.head_dim).permute(2, 0, 1, 3)
            outputs.append(out.reshape(count, self.heads * self.head_dim))
            first += count
        return add_projection(residual, self.o_proj, torch.cat(outputs))


class MLP(nn.Module):
    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, residual: Tensor, x: Tensor) -> Tensor:
        """residual + MLP(x)."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return add_projection(residual, self.down_proj, F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.eps = config.rms_norm_eps
        self.input_norm = nn.Parameter(torch.ones(config.hidden_size))
        self.attn = Attention(config)
        self.post_attention_norm = nn.Parameter(torch.ones(config.hidden_size))
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        layer: int,
        caches: Sequence[SequenceCache],
        counts: Sequence[int],
    ) -> Tensor:
        normed = rms_norm(x, self.input_norm, self.eps)
        x = self.attn(x, normed, rope, layer, caches, counts)
        return self.mlp(x, rms_norm(x, self.post_attention_norm, self.eps))


class CompiledForward(Protocol):
    """The kernels' Qwen3Forward (soprano/cpu/csrc/qwen3_cpu.cpp): `Qwen3.forward` in one call."""

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        owners: Tensor,
        keys: list[Tensor],
        values: list[Tensor],
        cos: Tensor,
        signed_sin: Tensor,
    ) -> Tensor: ...


def _panels(layer: nn.Module) -> Tensor:
    """A projection's panels; `use_panels(..., all_or_none=True)` has made each a PanelLinear."""
    if not isinstance(layer, PanelLinear):
        raise TypeError(f"expected a PanelLinear, got {type(layer).__name__}")
    return layer.panels


class Qwen3(nn.Module):
    """Token ids in, post-final-norm hidden states out; `logits` applies the LM head."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope = self._new_rope(config)
        self.compiled: CompiledForward | None = None
        """The compiled forward (`use_cpu_kernels`), or None to run the PyTorch one."""

    def blocks(self) -> list[Block]:
        """The layers as what they are (nn.ModuleList only knows them as Modules)."""
        return [block for block in self.layers if isinstance(block, Block)]

    @classmethod
    def from_hf_state(cls, config: LMConfig, state: dict[str, Tensor]) -> Qwen3:
        """Build from model.safetensors tensors (HF Qwen3 names), fusing q/k/v and gate/up."""
        with torch.device("meta"):
            model = cls(config)
        own: dict[str, Tensor] = {
            "embed_tokens.weight": state["model.embed_tokens.weight"],
            "norm": state["model.norm.weight"],
            "lm_head.weight": state.get("lm_head.weight", state["model.embed_tokens.weight"]),
        }
        for i in range(config.num_hidden_layers):
            hf, ours = f"model.layers.{i}.", f"layers.{i}."
            own |= {
                ours + "input_norm": state[hf + "input_layernorm.weight"],
                ours + "post_attention_norm": state[hf + "post_attention_layernorm.weight"],
                ours + "attn.qkv_proj.weight": torch.cat(
                    [state[hf + f"self_attn.{p}_proj.weight"] for p in "qkv"]
                ),
                ours + "attn.o_proj.weight": state[hf + "self_attn.o_proj.weight"],
                ours + "attn.qk_norm": torch.cat(
                    [
                        state[hf + "self_attn.q_norm.weight"].expand(
                            config.num_attention_heads, -1
                        ),
                        state[hf + "self_attn.k_norm.weight"].expand(
                            config.num_key_value_heads, -1
                        ),
                    ]
                ),
                ours + "mlp.gate_up_proj.weight": torch.cat(
                    [state[hf + "mlp.gate_proj.weight"], state[hf + "mlp.up_proj.weight"]]
                ),
                ours + "mlp.down_proj.weight": state[hf + "mlp.down_proj.weight"],
            }
        model.load_state_dict({k: v.float() for k, v in own.items()}, assign=True)
        model.requires_grad_(False)
        with torch.device("cpu"):
            model.rope = cls._new_rope(config)
        return model.eval()

    @staticmethod
    def _new_rope(config: LMConfig) -> RotaryEmbedding:
        return RotaryEmbedding(config.head_dim, config.rope_theta, config.max_position_embeddings)

    def new_cache(self, capacity: int) -> SequenceCache:
        """A cache for one sequence of up to `capacity` positions (prompt and new tokens)."""
        self.rope.reserve(capacity)
        return SequenceCache(self.config, capacity, self.norm.dtype, self.norm.device)

    def forward(
        self, tokens: Tensor, caches: Sequence[SequenceCache], counts: Sequence[int]
    ) -> Tensor:
        """Run the [N] new tokens of several sequences, `counts[i]` of `caches[i]` after the
        positions it holds, one sequence after the other; append their keys and values.

        Returns the post-final-norm hidden states [N, hidden_size].
        """
        if len(caches) != len(counts) or sum(counts) != len(tokens):
            raise ValueError("counts must give, per cache, how many of the tokens are its")
        for cache, count in zip(caches, counts, strict=True):
            if count < 1 or cache.length + count > cache.capacity:
                raise ValueError(
                    f"{count} tokens do not fit a cache of {cache.capacity} holding {cache.length}"
                )
        positions = torch.cat(
            [
                torch.arange(c.length, c.length + n, dtype=torch.long)
                for c, n in zip(caches, counts, strict=True)
            ]
        ).to(tokens.device)
        if self.compiled is None:
            hidden = self._forward(tokens, positions, caches, counts)
        else:
            owners = torch.repeat_interleave(torch.arange(len(caches)), torch.tensor(counts))
            hidden = self.compiled.forward(
                tokens,
                positions,
                owners,
                [cache.keys for cache in caches],
                [cache.values for cache in caches],
                self.rope.cos,
                self.rope.signed_sin,
            )
        for cache, count in zip(caches, counts, strict=True):
            cache.length += count
        return hidden

    def _forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        caches: Sequence[SequenceCache],
        counts: Sequence[int],
    ) -> Tensor:
        x = self.embed_tokens(tokens)
        cos = self.rope.cos[positions].unsqueeze(1).to(x.dtype)
        sin = self.rope.signed_sin[positions].unsqueeze(1).to(x.dtype)
        for layer, block in enumerate(self.layers):
            x = block(x, (cos, sin), layer, caches, counts)
        return rms_norm(x, self.norm, self.config.rms_norm_eps)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)

    def use_cpu_kernels(
        self, kernels: ModuleType, bf16_products: bool = False, int8: bool = False
    ) -> bool:
        """Hold the weights as bf16 panels and run the forward in the compiled kernels.

        Exact (fp32 products) unless `bf16_products`, or `int8` (lossy: every projection and the
        LM head on int8 panels, fp32 products; docs/kernels.md). Only where the weights are bf16
        values in a float32 model (any values, with `int8`) and the shapes suit the kernels;
        returns whether it was done.
        """
        config = self.config
        if self.norm.dtype != torch.float32 or config.head_dim % kernels.VECTOR_WIDTH:
            return False
        if int8:
            use_panels(self, kernels, torch.int8, rounded=True)
        elif not use_panels(self, kernels, torch.bfloat16, bf16_products, all_or_none=True):
            return False
        self.compiled = kernels.Qwen3Forward(
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            config.intermediate_size,
            config.rms_norm_eps,
            self.embed_tokens.weight,
            [
                [
                    block.input_norm,
                    _panels(block.attn.qkv_proj),
                    block.attn.qk_norm,
                    _panels(block.attn.o_proj),
                    block.post_attention_norm,
                    _panels(block.mlp.gate_up_proj),
                    _panels(block.mlp.down_proj),
                ]
                for block in self.blocks()
            ],
            self.norm,
        )
        return True
