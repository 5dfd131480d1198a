"""The decoder against the spec: checkpoint keys, numpy reference, batching and streaming."""

from __future__ import annotations

import copy
import math
from types import ModuleType

import numpy as np
import pytest
import torch

from soprano.constants import HOP_LENGTH, N_FFT, RECEPTIVE_FIELD, TOKEN_SAMPLES, UPSAMPLE_FACTOR
from soprano.cpu.linear import use_panels
from soprano.decoder import (
    SopranoDecoder,
    StreamingDecoder,
    WindowProduct,
    decode_streams,
    upsample,
)
from soprano.errors import ModelLoadError

SMALL = {"input_channels": 32, "dim": 48, "intermediate_dim": 144}
"""Small dims for fast tests; 8 blocks as published, so the receptive field is the real one."""


def published_state(
    dim: int, intermediate_dim: int, embed_kernel: int, input_channels: int = 512, blocks: int = 8
) -> dict[str, torch.Tensor]:
    """A random decoder.pth dict written from the key/shape table in docs/checkpoint.md."""
    generator = torch.Generator().manual_seed(dim + embed_kernel)
    shapes = {
        "decoder.embed.weight": (dim, input_channels, embed_kernel),
        "decoder.embed.bias": (dim,),
        "decoder.norm.weight": (dim,),
        "decoder.norm.bias": (dim,),
    }
    for i in range(blocks):
        block = f"decoder.convnext.{i}."
        shapes |= {
            block + "dwconv.weight": (dim, 1, 3),
            block + "dwconv.bias": (dim,),
            block + "norm.weight": (dim,),
            block + "norm.bias": (dim,),
            block + "pwconv1.weight": (intermediate_dim, dim),
            block + "pwconv1.bias": (intermediate_dim,),
            block + "pwconv2.weight": (dim, intermediate_dim),
            block + "pwconv2.bias": (dim,),
            block + "gamma": (dim,),
        }
    shapes |= {
        "decoder.final_layer_norm.weight": (dim,),
        "decoder.final_layer_norm.bias": (dim,),
        "head.out.weight": (N_FFT + 2, dim),
        "head.out.bias": (N_FFT + 2,),
    }
    state = {
        key: torch.randn(shape, generator=generator) / math.sqrt(shape[-1])
        for key, shape in shapes.items()
    }
    state["head.istft.window"] = torch.hann_window(N_FFT)
    return state


def small_decoder(embed_kernel: int, seed: int = 0, **sizes: int) -> SopranoDecoder:
    torch.manual_seed(seed)
    return SopranoDecoder(**(SMALL | sizes), embed_kernel=embed_kernel).eval()


# Loading


@pytest.mark.parametrize(
    ("dim", "intermediate_dim", "embed_kernel"),
    [(768, 2304, 1), (512, 1536, 3)],
    ids=["Soprano-1.1-80M", "Soprano-80M"],
)
def test_published_variants_load(dim: int, intermediate_dim: int, embed_kernel: int) -> None:
    state = published_state(dim, intermediate_dim, embed_kernel)
    decoder = SopranoDecoder.from_state_dict(state)
    sizes = (decoder.input_channels, decoder.dim, decoder.intermediate_dim)
    assert sizes == (512, dim, intermediate_dim)
    assert (decoder.num_blocks, decoder.embed_kernel) == (8, embed_kernel)
    assert decoder.decoder.embed.weight.shape == (dim, 512, embed_kernel)
    loaded = decoder.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], state[key]) for key in state)
    assert not decoder.training
    audio = decoder(torch.randn(2, 512, 3))
    assert audio.shape == (2, 2 * TOKEN_SAMPLES)
    assert torch.isfinite(audio).all()


def test_module_names_are_the_published_keys() -> None:
    """What the checkpoint generator saves is exactly the published layout."""
    for embed_kernel in (1, 3):
        decoder = small_decoder(embed_kernel)
        expected = published_state(48, 144, embed_kernel, input_channels=32)
        state = decoder.state_dict()
        assert {k: tuple(v.shape) for k, v in state.items()} == {
            k: tuple(v.shape) for k, v in expected.items()
        }
        assert torch.equal(state["head.istft.window"], torch.hann_window(N_FFT))


def test_random_init_gives_a_sane_waveform() -> None:
    torch.manual_seed(0)
    decoder = SopranoDecoder().eval()
    with torch.inference_mode():
        audio = decoder(torch.randn(1, 512, 4))
    assert torch.isfinite(audio).all()
    assert 1e-3 < audio.abs().max() < 1.0
    gammas = [block.gamma for block in decoder.decoder.convnext]
    assert all(torch.allclose(gamma, torch.full_like(gamma, 8**-0.5)) for gamma in gammas)


def _without(state: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: _without(s, "decoder.convnext.3.gamma"), "missing key decoder.convnext.3.gamma"),
        (lambda s: _without(s, "head.istft.window"), "missing key head.istft.window"),
        (lambda s: _without(s, "decoder.embed.weight"), "lacks the tensor decoder.embed.weight"),
        (lambda s: s | {"decoder.extra.weight": torch.zeros(3)}, "unexpected key decoder.extra"),
        (
            lambda s: s | {"decoder.convnext.8.gamma": torch.zeros(48)},
            "missing key decoder.convnext.8.dwconv.weight",
        ),
        (
            lambda s: s | {"head.out.weight": torch.zeros(N_FFT + 1, 48)},
            r"head.out.weight has shape \(2049, 48\), expected \(2050, 48\)",
        ),
        (
            lambda s: s | {"decoder.convnext.0.pwconv2.weight": torch.zeros(48, 100)},
            r"decoder.convnext.0.pwconv2.weight has shape \(48, 100\), expected \(48, 144\)",
        ),
        (
            lambda s: s | {"decoder.embed.weight": torch.zeros(48, 32, 2)},
            "even kernel",
        ),
        (
            lambda s: s | {"decoder.norm.bias": torch.zeros(48, dtype=torch.long)},
            "decoder.norm.bias is not a floating-point tensor",
        ),
    ],
    ids=[
        "missing",
        "missing-window",
        "missing-embed",
        "extra",
        "extra-block",
        "head-shape",
        "block-shape",
        "even-kernel",
        "integer",
    ],
)
def test_bad_state_dicts_raise(damage, message: str) -> None:
    state = damage(published_state(48, 144, 1, input_channels=32))
    with pytest.raises(ModelLoadError, match=message):
        SopranoDecoder.from_state_dict(state)


# Forward pass


@pytest.mark.parametrize("embed_kernel", [1, 3])
def test_output_length(embed_kernel: int) -> None:
    decoder = small_decoder(embed_kernel)
    with torch.inference_mode():
        for length in (0, 1, 2, 3, 6, 11):
            audio = decoder(torch.randn(2, 32, length))
            assert audio.shape == (2, TOKEN_SAMPLES * max(length - 1, 0))
            assert audio.dtype == torch.float32


def numpy_upsample(hidden: np.ndarray) -> np.ndarray:
    """[C, L] → [C, 4(L−1)+1]: frame t lies at source position t/4."""
    channels, length = hidden.shape
    out = np.empty((channels, UPSAMPLE_FACTOR * (length - 1) + 1))
    for t in range(out.shape[1]):
        k, f = divmod(t, UPSAMPLE_FACTOR)
        f /= UPSAMPLE_FACTOR
        right = hidden[:, min(k + 1, length - 1)]
        out[:, t] = (1 - f) * hidden[:, k] + f * right
    return out


def numpy_head_istft(head_output: np.ndarray) -> np.ndarray:
    """[2050, T] linear head output → waveform, straight from the formulas in docs/decoder.md."""
    bins = N_FFT // 2 + 1
    magnitude = np.minimum(np.exp(head_output[:bins]), 100.0)
    spectrum = magnitude * (np.cos(head_output[bins:]) + 1j * np.sin(head_output[bins:]))
    spectrum[0] = 0
    spectrum[N_FFT // 2] = 0
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)
    frames = spectrum.shape[1]
    signal = np.zeros(HOP_LENGTH * (frames - 1) + N_FFT)
    envelope = np.zeros_like(signal)
    for t in range(frames):
        start = t * HOP_LENGTH
        signal[start : start + N_FFT] += np.fft.irfft(spectrum[:, t], n=N_FFT) * window
        envelope[start : start + N_FFT] += window**2
    trim = N_FFT // 2
    return signal[trim:-trim] / envelope[trim:-trim]


def numpy_backbone(x: np.ndarray, state: dict[str, np.ndarray], embed_kernel: int) -> np.ndarray:
    """[C, T] → [D, T]: zero-padded convs, channel LayerNorms, exact-GELU ConvNeXt blocks."""

    def conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, depthwise: bool) -> np.ndarray:
        kernel = weight.shape[2]
        padded = np.pad(x, ((0, 0), (kernel // 2, kernel // 2)))
        out = np.zeros((weight.shape[0], x.shape[1]))
        for j in range(kernel):
            shifted = padded[:, j : j + x.shape[1]]
            out += weight[:, 0, j, None] * shifted if depthwise else weight[:, :, j] @ shifted
        return out + bias[:, None]

    def layer_norm(x: np.ndarray, prefix: str) -> np.ndarray:
        mean = x.mean(axis=0)
        var = x.var(axis=0)
        normed = (x - mean) / np.sqrt(var + 1e-6)
        return normed * state[prefix + "weight"][:, None] + state[prefix + "bias"][:, None]

    erf = np.vectorize(math.erf)
    x = conv(x, state["decoder.embed.weight"], state["decoder.embed.bias"], depthwise=False)
    x = layer_norm(x, "decoder.norm.")
    for i in range(8):
        p = f"decoder.convnext.{i}."
        y = conv(x, state[p + "dwconv.weight"], state[p + "dwconv.bias"], depthwise=True)
        y = layer_norm(y, p + "norm.")
        y = state[p + "pwconv1.weight"] @ y + state[p + "pwconv1.bias"][:, None]
        y = 0.5 * y * (1 + erf(y / math.sqrt(2)))
        y = state[p + "pwconv2.weight"] @ y + state[p + "pwconv2.bias"][:, None]
        x = x + state[p + "gamma"][:, None] * y
    return layer_norm(x, "decoder.final_layer_norm.")


def loud_edges_decoder(embed_kernel: int) -> SopranoDecoder:
    """A decoder whose DC/Nyquist bins and some magnitudes are large, so zeroing and clip matter."""
    decoder = small_decoder(embed_kernel)
    with torch.no_grad():
        bias = decoder.head.out.bias
        bias[0] = bias[N_FFT // 2] = 5.0
        bias[100:140] = 6.0  # exp(6) ≈ 403 > 100: clipped
    return decoder


def test_upsample_matches_numpy() -> None:
    hidden = torch.randn(2, 32, 7, dtype=torch.float64)
    upsampled = upsample(hidden)
    for row in range(2):
        expected = numpy_upsample(hidden[row].numpy())
        np.testing.assert_allclose(upsampled[row].numpy(), expected, atol=1e-12)
    assert torch.equal(upsampled[..., ::UPSAMPLE_FACTOR], hidden)


@pytest.mark.parametrize("embed_kernel", [1, 3])
def test_head_and_istft_match_numpy(embed_kernel: int) -> None:
    decoder = loud_edges_decoder(embed_kernel)
    hidden = torch.randn(1, 32, 6)
    with torch.inference_mode():
        features = decoder.decoder(upsample(hidden).transpose(1, 2))
        head_output = decoder.head.out(features)[0].T.double().numpy()
        audio = decoder(hidden)[0].numpy()
    assert np.exp(head_output[100:140]).max() > 100  # the clip is exercised
    np.testing.assert_allclose(audio, numpy_head_istft(head_output), atol=1e-4, rtol=0)


@pytest.mark.parametrize("embed_kernel", [1, 3])
def test_forward_matches_numpy_end_to_end(embed_kernel: int) -> None:
    decoder = loud_edges_decoder(embed_kernel)
    state = {key: value.double().numpy() for key, value in decoder.state_dict().items()}
    hidden = torch.randn(1, 32, 5)
    features = numpy_backbone(numpy_upsample(hidden[0].double().numpy()), state, embed_kernel)
    head_output = state["head.out.weight"] @ features + state["head.out.bias"][:, None]
    with torch.inference_mode():
        audio = decoder(hidden)[0].numpy()
    np.testing.assert_allclose(audio, numpy_head_istft(head_output), atol=1e-4, rtol=0)


def test_istft_equals_torch_istft() -> None:
    decoder = small_decoder(1)
    spectrum = torch.randn(2, N_FFT // 2 + 1, 9, dtype=torch.complex64)
    zeroed = spectrum.clone()
    zeroed[:, 0] = zeroed[:, -1] = 0
    expected = torch.istft(zeroed, N_FFT, HOP_LENGTH, N_FFT, torch.hann_window(N_FFT), center=True)
    torch.testing.assert_close(decoder.head.istft(spectrum), expected, atol=1e-6, rtol=0)


# Batch decoding


def test_batch_decode_crops_and_keeps_order() -> None:
    decoder = small_decoder(3)
    lengths = [3, 7, 1, 0, 5, 7, 2, 6]
    sequences = [torch.randn(length, 32) for length in lengths]
    with torch.inference_mode():
        alone = [decoder(sequence.T[None])[0] for sequence in sequences]
    single = decoder.decode(sequences, batch_size=1)
    assert [audio.shape for audio in single] == [a.shape for a in alone]
    for audio, expected in zip(single, alone, strict=True):
        torch.testing.assert_close(audio, expected, atol=1e-6, rtol=0)

    batched = decoder.decode(sequences, batch_size=3)
    assert [a.shape[0] for a in batched] == [TOKEN_SAMPLES * max(n - 1, 0) for n in lengths]
    # Groups (longest first): the two 7s and the 6; then 5, 3, 2; then 1, 0. Beyond the receptive
    # field of its first token, a padded sentence sounds exactly as when decoded alone.
    settled = RECEPTIVE_FIELD * TOKEN_SAMPLES
    for index, (audio, expected) in enumerate(zip(batched, alone, strict=True)):
        torch.testing.assert_close(audio[settled:], expected[settled:], atol=1e-5, rtol=0)
        if lengths[index] == 7:
            torch.testing.assert_close(audio, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(batched[0][:TOKEN_SAMPLES], alone[0][:TOKEN_SAMPLES], atol=1e-5)
    assert decoder.decode([], batch_size=2) == []


def test_batch_decode_rejects_bad_input() -> None:
    decoder = small_decoder(1)
    with pytest.raises(ValueError, match="batch_size"):
        decoder.decode([torch.randn(3, 32)], batch_size=0)
    with pytest.raises(ValueError, match=r"sequence 1 has shape \(3, 31\)"):
        decoder.decode([torch.randn(3, 32), torch.randn(3, 31)])


# Streaming


def stream(decoder: StreamingDecoder, frames: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
    """Push every frame; return after how many frames each chunk came, and all the pieces."""
    emitted_at, pieces = [], []
    for count, frame in enumerate(frames, start=1):
        chunk = decoder.push(frame)
        if chunk is not None:
            emitted_at.append(count)
            pieces.append(chunk)
    pieces.append(decoder.finish())
    return emitted_at, pieces


@pytest.mark.parametrize("embed_kernel", [1, 3])
@pytest.mark.parametrize("chunk_size", [1, 2, 5])
def test_streaming_equals_offline(embed_kernel: int, chunk_size: int) -> None:
    decoder = small_decoder(embed_kernel, seed=chunk_size)
    streaming = StreamingDecoder(decoder, chunk_size)
    for length in (0, 1, 2, 4, 5, 6, 7, 9, 10, 16):
        frames = torch.randn(length, 32)
        emitted_at, pieces = stream(streaming, frames)
        first = RECEPTIVE_FIELD + chunk_size
        assert emitted_at == list(range(first, length + 1, chunk_size))
        assert all(piece.shape == (chunk_size * TOKEN_SAMPLES,) for piece in pieces[:-1])
        offline = decoder.decode([frames])[0]
        torch.testing.assert_close(torch.cat(pieces), offline, atol=1e-5, rtol=0)


def test_streaming_with_fewer_blocks_keeps_the_schedule() -> None:
    """A smaller network (the tiny test checkpoints) still streams on the published schedule."""
    decoder = small_decoder(3, num_blocks=2)
    frames = torch.randn(9, 32)
    emitted_at, pieces = stream(StreamingDecoder(decoder, 2), frames)
    assert emitted_at == [6, 8]
    torch.testing.assert_close(torch.cat(pieces), decoder.decode([frames])[0], atol=1e-5, rtol=0)


def test_streaming_computes_every_frame_once() -> None:
    """Per chunk the network runs on the new frames only: the stream costs what offline does."""
    decoder = small_decoder(3)
    processed: list[int] = []
    for block in decoder.decoder.convnext:
        block.pwconv1.register_forward_hook(
            lambda _m, args, _o: processed.append(args[0].shape[:-1].numel())
        )
    frames = torch.randn(12, 32)
    decoder.decode([frames])
    offline = sum(processed)
    processed.clear()
    stream(StreamingDecoder(decoder, 1), frames)
    assert sum(processed) == offline == 8 * (UPSAMPLE_FACTOR * (12 - 1) + 1)
    assert max(processed) <= UPSAMPLE_FACTOR * (RECEPTIVE_FIELD + 1) + 1


def test_streaming_rejects_bad_use() -> None:
    decoder = small_decoder(1)
    with pytest.raises(ValueError, match="chunk_size"):
        StreamingDecoder(decoder, 0)
    with pytest.raises(ValueError, match="frame has shape"):
        StreamingDecoder(decoder).push(torch.randn(2, 32))
    with pytest.raises(ValueError, match="RECEPTIVE_FIELD"):
        StreamingDecoder(small_decoder(3, num_blocks=11))


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_cpu_kernels_decode_what_pytorch_decodes(
    chunk_size: int, compiled_kernels: ModuleType
) -> None:
    """The native kernels' fp32 panels (as SopranoTTS uses on CPU) change no sample."""
    decoder = small_decoder(1)
    frames = torch.randn(12, SMALL["input_channels"])
    expected = decoder.decode([frames])[0]
    fast = copy.deepcopy(decoder)
    linears = sum(isinstance(m, torch.nn.Linear) for m in fast.modules())
    assert use_panels(fast, compiled_kernels, torch.float32) == linears > 0
    assert not any(isinstance(m, torch.nn.Linear) for m in fast.modules())
    torch.testing.assert_close(fast.decode([frames])[0], expected, atol=1e-5, rtol=0)
    _, pieces = stream(StreamingDecoder(fast, chunk_size), frames)
    torch.testing.assert_close(torch.cat(pieces), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("embed_kernel", [1, 3])
def test_streams_decoded_together_get_the_bits_they_get_alone(
    embed_kernel: int, compiled_kernels: ModuleType
) -> None:
    """Streams of other lengths and chunk sizes, decoded in shared passes (on the kernels' fp32
    panels, whose products sum each row in one order), give each stream the bytes it gets
    alone: no row that the joined depthwise conv computes across two streams leaks into one."""
    decoder = small_decoder(embed_kernel)
    use_panels(decoder, compiled_kernels, torch.float32)
    decoder.decoder.embed = WindowProduct(decoder.decoder.embed)
    use_panels(decoder.decoder.embed, compiled_kernels, torch.float32)
    lengths, chunks = [14, 6, 11, 3, 0], [1, 2, 1, 5, 1]
    sentences = [torch.randn(length, SMALL["input_channels"]) for length in lengths]
    alone = [
        torch.cat(stream(StreamingDecoder(decoder, chunk, 8), sentence)[1])
        for chunk, sentence in zip(chunks, sentences, strict=True)
    ]
    streams = [StreamingDecoder(decoder, chunk, 8) for chunk in chunks]
    pieces: list[list[torch.Tensor]] = [[] for _ in streams]
    for step in range(max(lengths) + 1):
        due, flushes = [], []
        for index, (stream_, sentence) in enumerate(zip(streams, sentences, strict=True)):
            if step < len(sentence):
                stream_.add(sentence[step])
            if stream_.due or step == len(sentence):
                due.append(index)
                flushes.append(step == len(sentence))
        decoded = decode_streams([streams[i] for i in due], flushes)
        for index, piece in zip(due, decoded, strict=True):
            pieces[index].append(piece)
    for together, expected in zip(pieces, alone, strict=True):
        assert torch.equal(torch.cat(together), expected)
