"""Write a random-weight checkpoint in exactly the published Soprano layout.

Random weights make noise, not speech, but every shape, key name, file and token id is the real
one, so the whole pipeline runs end to end on them. `full` has the Soprano-1.1-80M dimensions
(for benchmarks); `tiny` is small enough for unit tests.

    python -m soprano.testing.make_checkpoint OUT [--size tiny|full] [--decoder 1.1|80m] [--seed N]
        [--stop-scale S] [--tokenizer tokenizer.json]

Its own tokenizer is character-level (the published vocabulary's single characters), so prompts
are about 1.45× as long as the real model's; `--tokenizer` takes the published tokenizer.json
instead where one is at hand, for benchmarks whose prefill should be the real one.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from soprano.checkpoint import (
    CONFIG_FILE,
    DECODER_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    LMConfig,
    lm_tensor_shapes,
)
from soprano.constants import AUDIO_CODES, AUDIO_TOKEN_OFFSET, START_ID, STOP_ID, TEXT_ID, UNK_ID
from soprano.decoder import SopranoDecoder

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TEXT_CHARACTERS = " !\"$%&'*+,-./0123456789<>?_abcdefghijklmnopqrstuvwxyz"
"""The single characters of the published vocabulary (docs/checkpoint.md), not its 135 merges."""

INITIALIZER_RANGE = 1 / 24
"""Standard deviation of the random weights, as in the published config.json."""


@dataclass(frozen=True)
class DecoderSize:
    dim: int
    intermediate_dim: int
    num_blocks: int
    embed_kernel: int


LM_SIZES = {
    "full": LMConfig(
        hidden_size=512,
        intermediate_size=2304,
        num_hidden_layers=17,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=128,
        vocab_size=8192,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        eos_token_id=STOP_ID,
    ),
    "tiny": LMConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=8192,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        eos_token_id=STOP_ID,
    ),
}

DECODER_SIZES = {
    ("full", "1.1"): DecoderSize(dim=768, intermediate_dim=2304, num_blocks=8, embed_kernel=1),
    ("full", "80m"): DecoderSize(dim=512, intermediate_dim=1536, num_blocks=8, embed_kernel=3),
    ("tiny", "1.1"): DecoderSize(dim=48, intermediate_dim=144, num_blocks=2, embed_kernel=1),
    ("tiny", "80m"): DecoderSize(dim=32, intermediate_dim=96, num_blocks=2, embed_kernel=3),
}

DEFAULT_STOP_SCALE = {"tiny": 2.5, "full": 0.0}
"""How much louder the [STOP] row of lm_head is than the others. A random model almost never
picks one token out of 8192; a scaled [STOP] row makes tiny-model sentences end after a few dozen
tokens of varied length, and a zero row (full) makes benchmark lengths exactly max_new_tokens."""


def make_checkpoint(
    out: Path,
    size: str = "tiny",
    decoder: str = "1.1",
    seed: int = 0,
    stop_scale: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer: Path | None = None,
) -> Path:
    """Write config, weights, tokenizer and decoder.pth to `out` and return it. `tokenizer`: a
    tokenizer.json with the published special and audio token ids to use instead of our own."""
    from safetensors.torch import save_file

    if size not in LM_SIZES:
        raise ValueError(f"size must be one of {sorted(LM_SIZES)}, got {size!r}")
    if (size, decoder) not in DECODER_SIZES:
        raise ValueError(f"decoder must be '1.1' or '80m', got {decoder!r}")
    config = LM_SIZES[size]
    tokenizer_json = None if tokenizer is None else _compatible_tokenizer(Path(tokenizer))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)

    state = {}
    for name, shape in lm_tensor_shapes(config).items():
        if len(shape) == 1:
            state[name] = torch.ones(shape)
        else:
            state[name] = torch.randn(shape, generator=generator) * INITIALIZER_RANGE
    scale = DEFAULT_STOP_SCALE[size] if stop_scale is None else stop_scale
    state["lm_head.weight"][STOP_ID] *= scale
    save_file(
        {k: v.to(dtype).contiguous() for k, v in state.items()},
        out / WEIGHTS_FILE,
        metadata={"format": "pt"},
    )

    dims = DECODER_SIZES[(size, decoder)]
    torch.manual_seed(seed)
    decoder_module = SopranoDecoder(
        input_channels=config.hidden_size,
        dim=dims.dim,
        intermediate_dim=dims.intermediate_dim,
        num_blocks=dims.num_blocks,
        embed_kernel=dims.embed_kernel,
    )
    torch.save(decoder_module.state_dict(), out / DECODER_FILE)

    _write_json(out / CONFIG_FILE, _config_json(config, dtype))
    _write_json(
        out / "generation_config.json",
        {"_from_model_config": True, "bos_token_id": STOP_ID, "eos_token_id": STOP_ID},
    )
    _write_tokenizer(out, tokenizer_json)
    return out


def _compatible_tokenizer(path: Path) -> str:
    """The text of a tokenizer.json whose special and audio tokens have the published ids."""
    from tokenizers import Tokenizer

    text = path.read_text(encoding="utf-8")
    try:
        loaded = Tokenizer.from_str(text)
    except Exception as error:  # tokenizers raises a bare Exception for a file it cannot parse
        raise ValueError(f"{path} is not a tokenizer.json: {error}") from error
    expected = {"[UNK]": UNK_ID, "[TEXT]": TEXT_ID, "[START]": START_ID, "[STOP]": STOP_ID}
    expected |= {f"[{code}]": code + AUDIO_TOKEN_OFFSET for code in (0, AUDIO_CODES - 1)}
    for token, token_id in expected.items():
        if loaded.token_to_id(token) != token_id:
            raise ValueError(f"{path}: {token} must have id {token_id} as in Soprano's vocabulary")
    return text


def _config_json(config: LMConfig, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": STOP_ID,
        "eos_token_id": config.eos_token_id,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": INITIALIZER_RANGE,
        "intermediate_size": config.intermediate_size,
        "layer_types": ["full_attention"] * config.num_hidden_layers,
        "max_position_embeddings": config.max_position_embeddings,
        "max_window_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": config.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": config.vocab_size,
    }


def _write_tokenizer(out: Path, tokenizer_json: str | None = None) -> None:
    """`tokenizer_json`, or a character-level tokenizer with the published special and audio
    token ids, and the files that describe it."""
    if tokenizer_json is None:
        _character_tokenizer().save(str(out / TOKENIZER_FILE))
    else:
        (out / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
    _write_json(
        out / "tokenizer_config.json",
        {
            "model_max_length": 2048,
            "padding_side": "left",
            "pad_token": "[STOP]",
            "unk_token": "[UNK]",
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
        },
    )
    _write_json(out / "special_tokens_map.json", {"pad_token": "[STOP]"})


def _character_tokenizer() -> Tokenizer:
    """The published special and audio token ids, and the vocabulary's single characters."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

    specials = {"[UNK]": UNK_ID, "[TEXT]": TEXT_ID, "[START]": START_ID, "[STOP]": STOP_ID}
    audio = {f"[{code}]": code + AUDIO_TOKEN_OFFSET for code in range(AUDIO_CODES)}
    first_text_id = AUDIO_TOKEN_OFFSET + AUDIO_CODES
    text = {char: first_text_id + i for i, char in enumerate(TEXT_CHARACTERS)}
    tokenizer = Tokenizer(
        models.BPE(vocab={**specials, **audio, **text}, merges=[], unk_token="[UNK]")
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " ")]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(Regex(r"\s+|\w+|[^\w\s]+"), behavior="isolated"),
        ]
    )
    ordered = sorted({**specials, **audio}.items(), key=lambda item: item[1])
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, _ in ordered]
    )
    tokenizer.enable_padding(direction="left", pad_id=STOP_ID, pad_token="[STOP]")
    return tokenizer


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write")
    parser.add_argument("--size", choices=sorted(LM_SIZES), default="tiny")
    parser.add_argument(
        "--decoder",
        choices=["1.1", "80m"],
        default="1.1",
        help="decoder variant: Soprano-1.1-80M (768, kernel 1) or Soprano-80M",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stop-scale",
        type=float,
        default=None,
        help="scale of the [STOP] row of lm_head (default: tiny 2.5, full 0)",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a tokenizer.json with Soprano's token ids (the published one) to use instead of "
        "the character-level one",
    )
    args = parser.parse_args(argv)
    try:
        path = make_checkpoint(
            args.out, args.size, args.decoder, args.seed, args.stop_scale, tokenizer=args.tokenizer
        )
    except (OSError, ValueError) as error:
        parser.error(str(error))
    print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
