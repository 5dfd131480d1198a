"""Finding and reading a Soprano checkpoint: a local folder or a Hugging Face repo id.

The published layout (docs/checkpoint.md): the HF LM files (config.json, model.safetensors,
tokenizer.json, ...) and decoder.pth side by side. Backbone sizes come from config.json
and the decoder variant from the shapes in decoder.pth (docs/checkpoint.md).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from soprano.constants import DEFAULT_MODEL, STOP_ID
from soprano.errors import ModelLoadError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
DECODER_FILE = "decoder.pth"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, DECODER_FILE)
OPTIONAL_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class LMConfig:
    """The Qwen3 backbone hyper-parameters that the backends need."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    eos_token_id: int

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: Path) -> LMConfig:
        required = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
            "max_position_embeddings",
        )
        missing = [key for key in required if key not in raw]
        if missing:
            raise ModelLoadError(f"{source}: missing keys {', '.join(missing)}")
        heads = int(raw["num_attention_heads"])
        try:
            return cls(
                hidden_size=int(raw["hidden_size"]),
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or int(raw["hidden_size"]) // heads),
                vocab_size=int(raw["vocab_size"]),
                max_position_embeddings=int(raw["max_position_embeddings"]),
                rope_theta=float(raw.get("rope_theta") or 10000.0),
                rms_norm_eps=float(raw.get("rms_norm_eps") or 1e-6),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                eos_token_id=int(raw.get("eos_token_id", STOP_ID)),
            )
        except (TypeError, ValueError) as error:
            raise ModelLoadError(f"{source}: invalid value ({error})") from error


@dataclass(frozen=True)
class Checkpoint:
    """A complete local checkpoint folder."""

    path: Path
    config: LMConfig

    @classmethod
    def from_folder(cls, path: Path) -> Checkpoint:
        path = Path(path)
        missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
        if missing:
            raise ModelLoadError(
                f"model folder {path} is missing {', '.join(missing)} "
                f"(a Soprano checkpoint holds {', '.join(REQUIRED_FILES)})"
            )
        config_path = path / CONFIG_FILE
        try:
            raw = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelLoadError(f"cannot read {config_path}: {error}") from error
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{config_path} does not hold a JSON object")
        return cls(path=path, config=LMConfig.from_dict(raw, config_path))

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    def load_decoder_state(self) -> dict[str, torch.Tensor]:
        """Read decoder.pth (a pickled dict of tensors) without executing arbitrary pickles."""
        path = self.path / DECODER_FILE
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for corrupt files
            raise ModelLoadError(f"cannot read decoder weights {path}: {error}") from error
        if not isinstance(state, dict) or not all(
            isinstance(value, torch.Tensor) for value in state.values()
        ):
            raise ModelLoadError(f"{path} does not hold a dict of tensors")
        return state

    def load_lm_state(self) -> dict[str, torch.Tensor]:
        """Read model.safetensors, checking every tensor against config.json."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(self.weights_path)
        except (OSError, SafetensorError, ValueError) as error:
            raise ModelLoadError(f"cannot read LM weights {self.weights_path}: {error}") from error
        expected = lm_tensor_shapes(self.config)
        for name, shape in expected.items():
            if name not in state:
                raise ModelLoadError(f"{self.weights_path}: missing tensor {name}")
            if tuple(state[name].shape) != shape:
                raise ModelLoadError(
                    f"{self.weights_path}: {name} has shape {tuple(state[name].shape)}, "
                    f"config.json implies {shape}"
                )
        return state


def lm_tensor_shapes(config: LMConfig) -> dict[str, tuple[int, ...]]:
    """The published Qwen3 tensor names and shapes (docs/checkpoint.md, tensor names)."""
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, d),
        "model.norm.weight": (d,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        shapes |= {
            layer + "input_layernorm.weight": (d,),
            layer + "post_attention_layernorm.weight": (d,),
            layer + "self_attn.q_proj.weight": (q, d),
            layer + "self_attn.k_proj.weight": (kv, d),
            layer + "self_attn.v_proj.weight": (kv, d),
            layer + "self_attn.o_proj.weight": (d, q),
            layer + "self_attn.q_norm.weight": (hd,),
            layer + "self_attn.k_norm.weight": (hd,),
            layer + "mlp.gate_proj.weight": (f, d),
            layer + "mlp.up_proj.weight": (f, d),
            layer + "mlp.down_proj.weight": (d, f),
        }
    return shapes


def resolve_checkpoint(
    model: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> Checkpoint:
    """A local folder as is; a repo id downloaded once into the HF cache (or `cache_dir`).

    With HF_HUB_OFFLINE=1 a repo id is served from the cache alone.
    """
    model = str(model) if model is not None else DEFAULT_MODEL
    local = Path(model).expanduser()
    if local.is_dir():
        return Checkpoint.from_folder(local)
    if local.exists():
        raise ModelLoadError(f"model path {local} is a file; pass the checkpoint folder")
    if not _REPO_ID.match(model):
        raise ModelLoadError(f"model {model!r} is neither an existing folder nor a repo id")
    return Checkpoint.from_folder(download(model, cache_dir))


def download(repo_id: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Fetch (or find in the cache) the files of a hub checkpoint."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id,
            cache_dir=None if cache_dir is None else Path(cache_dir),
            allow_patterns=[*REQUIRED_FILES, *OPTIONAL_FILES],
        )
    except Exception as error:  # the hub client raises many types: HTTP, offline, missing repo
        raise ModelLoadError(
            f"cannot get model {repo_id!r} from the Hugging Face hub and it is not in the cache "
            f"({type(error).__name__}: {error}). Connect once to download it, or pass a local "
            "checkpoint folder."
        ) from error
    return Path(folder)
