"""The Soprano decoder: LM hidden states → 32 kHz waveform (docs/decoder.md).

Vocos-style: linear ×4 upsampling, a backbone of ConvNeXt blocks and an iSTFT head. Besides the
plain forward pass it offers batch decoding with left zero-padding (docs/generation.md) and an
incremental streaming decoder (docs/decoder.md) that computes every frame once and still equals
the offline decode.

Every convolution here is a "valid" convolution over a window that carries `context` extra frames
on each side. Offline decoding pads those frames with zeros (the same as zero-padded convs);
streaming carries the last frames of the previous chunk instead. One code path serves both, which
is what makes streamed audio equal offline audio.

The backbone holds its activations frames-major, [B, T, channels]: a streamed chunk is a few
frames, and in this layout its windows are joined, convolved and added as whole rows (a few
copies of contiguous memory) rather than as hundreds of short strided runs, which cost a
streaming pass more than its products did (docs/decoder.md, streaming).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soprano.constants import (
    HOP_LENGTH,
    N_FFT,
    RECEPTIVE_FIELD,
    TOKEN_SAMPLES,
    UPSAMPLE_FACTOR,
)
from soprano.errors import ModelLoadError

SPECTRUM_BINS = N_FFT // 2 + 1
"""Frequency bins of one STFT frame (1025): the head predicts a log-magnitude and a phase each."""

MAX_MAGNITUDE = 100.0
"""Upper clip of exp(log-magnitude), a safeguard of the published head."""

FRAMES_PER_SAMPLE = N_FFT // HOP_LENGTH
"""iSTFT frames that overlap at each output sample (4): a frame is that many hops long."""
assert FRAMES_PER_SAMPLE * HOP_LENGTH == N_FFT

LAYER_NORM_EPS = 1e-6
DEPTHWISE_KERNEL = 3
INIT_STD = 0.02
"""Standard deviation of the random backbone weights (Vocos' initialisation)."""

_BLOCK_KEY = re.compile(r"decoder\.convnext\.(\d+)\.")

Stage = Callable[[Tensor], Tensor]


def upsample(hidden: Tensor) -> Tensor:
    """Interpolate [B, C, L] linearly to 4·(L−1)+1 frames; frame 4k is token k exactly."""
    length = hidden.shape[-1]
    if length < 2:
        return hidden
    size = UPSAMPLE_FACTOR * (length - 1) + 1
    return F.interpolate(hidden, size=size, mode="linear", align_corners=True)


def _inner(window: Tensor, context: int) -> Tensor:
    """The middle of the time axis (dim 1) of a [B, T + 2·context, …] tensor: a frames-major
    window's frames that have context on both sides, or a signal's samples past a trim."""
    return window[:, context : window.shape[1] - context]


def _pad_frames(x: Tensor, before: int, after: int) -> Tensor:
    """Zero frames before and after the frames of a [B, T, C] tensor."""
    return F.pad(x, (0, 0, before, after))


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, then a channel MLP scaled per channel by gamma, added to the input."""

    context = DEPTHWISE_KERNEL // 2

    def __init__(self, dim: int, intermediate_dim: int, layer_scale: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, DEPTHWISE_KERNEL, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, window: Tensor) -> Tensor:
        """Map a frames-major [B, T + 2·context, D] window to its T inner frames."""
        y = self.depthwise(window)
        rows = y.reshape(-1, y.shape[-1])
        return _inner(window, self.context) + self.channel_mlp(rows, [len(rows)]).view(y.shape)

    def depthwise(self, window: Tensor) -> Tensor:
        """The depthwise conv of a [B, T + 2·context, D] window: [B, T, D].

        Written as a product and a sum per tap, in tap order, so that every frame's value is the
        same IEEE arithmetic however many frames or streams share the call (PyTorch's
        convolution promises no order) and the frames-major rows need no transpose.
        """
        bias = self.dwconv.bias
        assert bias is not None  # the published blocks' convs have one
        taps = self.dwconv.weight[:, 0].T.contiguous()  # [kernel, D]
        frames = window.shape[1] - 2 * self.context
        y = window[:, :frames] * taps[0]
        for tap in range(1, len(taps)):
            y += window[:, tap : tap + frames] * taps[tap]
        return y + bias

    def channel_mlp(self, rows: Tensor, sizes: Sequence[int]) -> Tensor:
        """The per-frame part of the block on [frames, D] rows, made of runs of `sizes` frames.

        Row by row (LayerNorm and the products) a frame's result does not depend on the other
        rows. GELU's vectorised loop leaves a scalar tail that depends on the tensor's size, so
        it runs on each run of frames alone: a stream decoded next to others gets the same bits.
        """
        hidden = self.pwconv1(self.norm(rows))
        hidden = torch.cat([self.act(part) for part in hidden.split(list(sizes))])
        return self.gamma * self.pwconv2(hidden)


class VocosBackbone(nn.Module):
    """Embed conv, LayerNorm, ConvNeXt blocks, final LayerNorm; frames-major [B, T, C] →
    [B, T, D]."""

    def __init__(
        self,
        input_channels: int,
        dim: int,
        intermediate_dim: int,
        num_blocks: int,
        embed_kernel: int,
    ) -> None:
        super().__init__()
        if embed_kernel < 1 or embed_kernel % 2 == 0:
            raise ValueError(f"embed_kernel must be odd and positive, got {embed_kernel}")
        self.embed_context = embed_kernel // 2
        self.embed: nn.Module = nn.Conv1d(input_channels, dim, embed_kernel)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        # Layer scale 1/√blocks (1/√8 for the published models) keeps a random model's
        # residual stream, and so its waveform, at a sane level.
        layer_scale = 1 / math.sqrt(num_blocks)
        self.convnext = nn.ModuleList(
            ConvNeXtBlock(dim, intermediate_dim, layer_scale) for _ in range(num_blocks)
        )
        self.final_layer_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.apply(_init_weights)

    def stages(self) -> list[tuple[Stage, int]]:
        """The frame-mixing steps in order, each with the context it reads on each side."""
        return [
            (self._embed, self.embed_context),
            *(
                (block, block.context)
                for block in self.convnext
                if isinstance(block, ConvNeXtBlock)
            ),
        ]

    @property
    def context(self) -> int:
        """Upsampled frames on each side that one output frame depends on."""
        return sum(context for _, context in self.stages())

    def _embed(self, window: Tensor) -> Tensor:
        if isinstance(self.embed, WindowProduct):
            frames = self.embed(window)
        else:
            frames = self.embed(window.transpose(1, 2)).transpose(1, 2)
        return self.norm(frames)

    def forward(self, x: Tensor) -> Tensor:
        for stage, context in self.stages():
            x = stage(_pad_frames(x, context, context))
        return self.final_layer_norm(x)


class WindowProduct(nn.Module):
    """A Conv1d of one group as a matrix product of each output frame's input window, so that
    the CPU kernels' GEMM can take it (tts.py): there every output is summed in one fixed order
    whatever the thread count, which PyTorch's convolution does not promise (its 1×1 embed gave
    other bits at 2 threads than at 1, from 24 tokens on)."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        if not (
            isinstance(conv, nn.Conv1d)
            and conv.groups == 1
            and conv.bias is not None
            and conv.stride == conv.dilation == (1,)
            and conv.padding == (0,)
        ):
            raise ValueError("a window product takes a plain Conv1d (one group, a bias)")
        out_channels, _, self.kernel = conv.weight.shape
        self.linear = nn.Linear(conv.weight[0].numel(), out_channels, device=conv.weight.device)
        self.linear.weight.data = conv.weight.detach().reshape(out_channels, -1)
        self.linear.bias.data = conv.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        """Frames-major [B, T + kernel − 1, C] → [B, T, out]; a window is channel-major, as
        the weight."""
        windows = x.unfold(1, self.kernel, 1)  # [B, T, C, kernel]
        return self.linear(windows.reshape(*windows.shape[:2], -1))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv1d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ISTFT(nn.Module):
    """Inverse STFT as torch.istft(center=True) computes it, split so that streaming can reuse it.

    The DC and Nyquist bins are zeroed first (docs/decoder.md, forward).
    """

    window: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(N_FFT))

    def frames(self, spectrum: Tensor) -> Tensor:
        """Complex [B, 1025, T] spectrum → windowed time frames [B, N_FFT, T]."""
        inner = spectrum[:, 1:-1]
        edge = inner.new_zeros(inner.shape[0], 1, inner.shape[2])
        spectrum = torch.cat((edge, inner, edge), dim=1)
        return torch.fft.irfft(spectrum, n=N_FFT, dim=1) * self.window[:, None]

    def overlap_add(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Overlap-add T frames with the hop; also the summed squared window to divide by.

        Returns the signal [B, HOP·(T−1) + N_FFT] and the envelope [1, same length].
        """
        count = frames.shape[-1]
        squared = (self.window**2)[None, :, None].expand(1, N_FFT, count)
        return _overlap_add(frames), _overlap_add(squared)

    def forward(self, spectrum: Tensor) -> Tensor:
        """[B, 1025, T] → [B, HOP·(T−1)] samples: overlap-add, trim N_FFT/2 each end, normalise."""
        signal, envelope = self.overlap_add(self.frames(spectrum))
        trim = N_FFT // 2
        return _inner(signal, trim) / _inner(envelope, trim)


def _overlap_add(frames: Tensor) -> Tensor:
    """Sum [B, N_FFT, T] frames placed HOP_LENGTH apart: [B, HOP·(T−1) + N_FFT].

    A frame is FRAMES_PER_SAMPLE hops, so this is that many shifted additions of whole hops,
    each sample summing its frames from the latest to the earliest (F.fold, which adds one
    sample at a time, cost a streamed chunk more than its FFTs).
    """
    batch, _, count = frames.shape
    hops = frames.reshape(batch, FRAMES_PER_SAMPLE, HOP_LENGTH, count).transpose(2, 3)
    signal = frames.new_zeros(batch, HOP_LENGTH * (count + FRAMES_PER_SAMPLE - 1))
    for hop in range(FRAMES_PER_SAMPLE):
        signal[:, hop * HOP_LENGTH : (hop + count) * HOP_LENGTH] += hops[:, hop].reshape(batch, -1)
    return signal


class ISTFTHead(nn.Module):
    """Linear D → 2050 per frame: log-magnitude and phase of each bin, then the iSTFT."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out = nn.Linear(dim, 2 * SPECTRUM_BINS)
        self.istft = ISTFT()

    def spectrum(self, x: Tensor) -> Tensor:
        """Frames-major [B, T, D] backbone output → complex spectrum [B, 1025, T]."""
        return self.polar(self.out(x))

    @staticmethod
    def polar(projected: Tensor) -> Tensor:
        """[B, T, 2050] projections (log-magnitudes, then phases) → complex [B, 1025, T]."""
        log_magnitude, phase = projected.transpose(1, 2).chunk(2, dim=1)
        magnitude = torch.exp(log_magnitude).clamp(max=MAX_MAGNITUDE)
        return torch.polar(magnitude, phase)

    def forward(self, x: Tensor) -> Tensor:
        return self.istft(self.spectrum(x))


class SopranoDecoder(nn.Module):
    """Hidden states [B, C, L] → waveform [B, TOKEN_SAMPLES·(L−1)] (docs/decoder.md, forward).

    Attribute names match the published decoder.pth keys (`decoder.*`, `head.*`).
    """

    def __init__(
        self,
        input_channels: int = 512,
        dim: int = 768,
        intermediate_dim: int = 2304,
        num_blocks: int = 8,
        embed_kernel: int = 1,
    ) -> None:
        super().__init__()
        self.input_channels = input_channels
        self.dim = dim
        self.intermediate_dim = intermediate_dim
        self.num_blocks = num_blocks
        self.embed_kernel = embed_kernel
        self.decoder = VocosBackbone(
            input_channels, dim, intermediate_dim, num_blocks, embed_kernel
        )
        self.head = ISTFTHead(dim)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> SopranoDecoder:
        """Build the decoder that `state` (a decoder.pth dict) describes and load it strictly.

        The sizes come from the tensor shapes (docs/checkpoint.md), so Soprano-1.1-80M
        (768, embed kernel 1) and Soprano-80M (512, embed kernel 3) both load.
        """
        embed = _shaped(state, "decoder.embed.weight", 3)
        pwconv1 = _shaped(state, "decoder.convnext.0.pwconv1.weight", 2)
        dim, input_channels, embed_kernel = embed.shape
        if embed_kernel % 2 == 0:
            raise ModelLoadError(
                f"decoder.embed.weight has an even kernel ({embed_kernel}); "
                "the decoder needs an odd one"
            )
        num_blocks = 1 + max(int(m[1]) for key in state if (m := _BLOCK_KEY.match(key)))
        with torch.device("meta"):
            model = cls(input_channels, dim, pwconv1.shape[0], num_blocks, embed_kernel)
        _check_state(state, model.state_dict(), model)
        model.load_state_dict(
            {key: value.detach().to(torch.float32) for key, value in state.items()},
            strict=True,
            assign=True,
        )
        return model.eval()

    def extra_repr(self) -> str:
        return (
            f"input_channels={self.input_channels}, dim={self.dim}, "
            f"intermediate_dim={self.intermediate_dim}, num_blocks={self.num_blocks}, "
            f"embed_kernel={self.embed_kernel}"
        )

    @property
    def device(self) -> torch.device:
        return self.head.istft.window.device

    def forward(self, hidden: Tensor) -> Tensor:
        hidden = hidden.to(self.device, torch.float32)
        if hidden.shape[-1] < 2:
            return hidden.new_zeros(hidden.shape[0], 0)
        return self.head(self.decoder(upsample(hidden).transpose(1, 2)))

    @torch.inference_mode()
    def decode(self, sequences: Sequence[Tensor], batch_size: int = 1) -> list[Tensor]:
        """Decode sentences of [L_i, C] hidden states into 1-D waveforms (docs/generation.md).

        Longest first, `batch_size` at a time, each left-padded with zero vectors to the longest
        of its group; the last (L_i−1)·TOKEN_SAMPLES samples are its audio. With padding a
        sentence's first samples can differ slightly from decoding it alone, as upstream.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        for index, sequence in enumerate(sequences):
            if sequence.ndim != 2 or sequence.shape[1] != self.input_channels:
                raise ValueError(
                    f"sequence {index} has shape {tuple(sequence.shape)}; "
                    f"expected [frames, {self.input_channels}]"
                )
        order = sorted(range(len(sequences)), key=lambda i: -sequences[i].shape[0])
        audio: dict[int, Tensor] = {}
        for start in range(0, len(order), batch_size):
            group = order[start : start + batch_size]
            longest = sequences[group[0]].shape[0]
            batch = torch.zeros(len(group), self.input_channels, longest, device=self.device)
            for row, index in enumerate(group):
                frames = sequences[index]
                batch[row, :, longest - frames.shape[0] :] = frames.T
            waveform = self(batch)
            for row, index in enumerate(group):
                keep = TOKEN_SAMPLES * max(sequences[index].shape[0] - 1, 0)
                audio[index] = waveform[row, waveform.shape[1] - keep :]
        return [audio[index] for index in range(len(sequences))]


def _shaped(state: Mapping[str, Tensor], key: str, ndim: int) -> Tensor:
    value = state.get(key)
    if not isinstance(value, Tensor):
        raise ModelLoadError(f"decoder state dict lacks the tensor {key}")
    if value.ndim != ndim:
        raise ModelLoadError(f"{key} has shape {tuple(value.shape)}; expected {ndim} dimensions")
    return value


def _check_state(
    state: Mapping[str, Tensor], expected: Mapping[str, Tensor], model: nn.Module
) -> None:
    """Raise one ModelLoadError that lists every missing, unexpected and misshapen key."""
    problems = [f"missing key {key}" for key in expected if key not in state]
    problems += [f"unexpected key {key}" for key in state if key not in expected]
    for key, value in state.items():
        if key not in expected:
            continue
        if not isinstance(value, Tensor) or not value.is_floating_point():
            problems.append(f"{key} is not a floating-point tensor")
        elif value.shape != expected[key].shape:
            problems.append(
                f"{key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
            )
    if problems:
        raise ModelLoadError(
            f"decoder state dict does not fit a Soprano decoder ({model.extra_repr()}): "
            + "; ".join(problems)
        )


@dataclass(frozen=True)
class ChunkSchedule:
    """How many tokens each streamed chunk holds: `first` at first, then half the tokens sent so
    far, between `first` and `largest`.

    Small chunks give the first audio early; later ones grow while the audio already sent keeps
    the listener busy, so that a stream costs about what offline decoding costs. The sizes
    depend only on the stream itself, never on the load, so the audio is the same however
    busy the server is (the chunk boundaries change the float rounding).
    """

    first: int = 1
    largest: int | None = None
    """None: every chunk is `first` tokens."""

    def __post_init__(self) -> None:
        for name, value in (("chunk_size", self.first), ("max_chunk_size", self.largest)):
            if value is None and name == "max_chunk_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.largest is not None and self.largest < self.first:
            raise ValueError(
                f"max_chunk_size ({self.largest}) must be at least chunk_size ({self.first})"
            )

    def size_after(self, sent_tokens: int) -> int:
        """Tokens of the chunk that follows `sent_tokens` tokens of audio."""
        if self.largest is None or sent_tokens == 0:
            return self.first
        return max(self.first, min(self.largest, sent_tokens // 2))


class StreamingDecoder:
    """Decode one sentence frame by frame; the emitted pieces concatenate to the offline decode.

    The first chunk comes out once RECEPTIVE_FIELD + schedule.first frames are in, each later one
    after as many more frames as the schedule says, and `finish` returns the rest. Unlike
    upstream, which re-decodes a window of 2·RF + chunk_size frames per chunk, each frame goes
    through the network once: every stage keeps the few input frames its convolution still
    needs as context, and the overlap-add keeps its unfinished tail (docs/decoder.md).
    `decode_streams` decodes many such streams in one pass; `finish` resets the state, so the
    object can decode the next sentence.
    """

    def __init__(
        self, decoder: SopranoDecoder, chunk_size: int = 1, max_chunk_size: int | None = None
    ) -> None:
        self.schedule = ChunkSchedule(chunk_size, max_chunk_size)
        if _lookahead_tokens(decoder) > RECEPTIVE_FIELD:
            raise ValueError(
                f"a decoder with {decoder.num_blocks} blocks and embed kernel "
                f"{decoder.embed_kernel} sees further than RECEPTIVE_FIELD={RECEPTIVE_FIELD} "
                "tokens and cannot stream losslessly"
            )
        self.decoder = decoder
        self._reset()

    def _reset(self) -> None:
        decoder = self.decoder
        device = decoder.device
        self._frames_in = 0
        self._sent_tokens = 0
        self._chunk_tokens = self.schedule.first
        self._next_chunk_at = RECEPTIVE_FIELD + self._chunk_tokens
        self._pending: list[Tensor] = []
        self._previous_frame: Tensor | None = None
        # Left context of every stage starts as the zero padding of the offline decode.
        channels = [decoder.input_channels] + [decoder.dim] * decoder.num_blocks
        self._stage_tails = [
            torch.zeros(1, context, width, device=device)
            for width, (_, context) in zip(channels, decoder.decoder.stages(), strict=True)
        ]
        # Overlap-add sums of the positions that later frames still reach.
        self._signal_tail = torch.zeros(1, N_FFT - HOP_LENGTH, device=device)
        self._envelope_tail = torch.zeros(1, N_FFT - HOP_LENGTH, device=device)
        self._still_to_trim = N_FFT // 2
        self._ready = torch.zeros(0, device=device)

    def add(self, frame: Tensor) -> None:
        """Add one [C] hidden state."""
        if frame.shape != (self.decoder.input_channels,):
            raise ValueError(
                f"frame has shape {tuple(frame.shape)}; expected [{self.decoder.input_channels}]"
            )
        self._pending.append(frame.to(self.decoder.device, torch.float32))
        self._frames_in += 1

    @property
    def due(self) -> bool:
        """Whether the frames added complete the next chunk."""
        return self._frames_in >= self._next_chunk_at

    @property
    def frames_until_due(self) -> int:
        """Frames still to add before the next chunk is complete (0 when it is due)."""
        return max(0, self._next_chunk_at - self._frames_in)

    def push(self, frame: Tensor) -> Tensor | None:
        """Add one [C] hidden state; return the next chunk of samples once it is complete."""
        self.add(frame)
        return decode_streams([self])[0] if self.due else None

    def finish(self) -> Tensor:
        """Return every sample not yet emitted and start over for a new sentence."""
        return decode_streams([self], [True])[0]

    def _take(self, samples: Tensor, flush: bool) -> Tensor:
        """What the stream emits, given the final samples that its pending frames decoded to."""
        if flush:
            rest = torch.cat((self._ready, samples))
            self._reset()
            return rest
        self._ready = torch.cat((self._ready, samples))
        chunk_samples = self._chunk_tokens * TOKEN_SAMPLES
        chunk, self._ready = self._ready[:chunk_samples], self._ready[chunk_samples:]
        self._sent_tokens += self._chunk_tokens
        self._chunk_tokens = self.schedule.size_after(self._sent_tokens)
        self._next_chunk_at += self._chunk_tokens
        return chunk

    def _upsample_pending(self) -> Tensor:
        """Upsampled frames that the pending tokens add (4 per token after the first), as
        frames-major [1, frames, C]."""
        tokens = self._pending
        self._pending = []
        if not tokens:
            return torch.zeros(1, 0, self.decoder.input_channels, device=self.decoder.device)
        previous = self._previous_frame
        continuing = previous is not None
        if previous is not None:
            tokens = [previous, *tokens]
        self._previous_frame = tokens[-1]
        frames = upsample(torch.stack(tokens, dim=1)[None]).transpose(1, 2)
        # The previous token's own frame went out with the previous call.
        return frames[:, 1:] if continuing else frames

    def _window(self, index: int, context: int, x: Tensor, flush: bool) -> Tensor | None:
        """New frames of one stage behind its kept context (and, with `flush`, the right zero
        padding); keeps its last 2·context inputs for the next call. None if it yields no frame
        (a 1×1 embed fed nothing: finish right after a chunk)."""
        parts = [self._stage_tails[index], x]
        if flush:
            parts.append(x.new_zeros(1, context, x.shape[2]))
        window = torch.cat(parts, dim=1)
        self._stage_tails[index] = window[:, window.shape[1] - 2 * context :]
        return window if window.shape[1] > 2 * context else None

    def _overlap_add(self, spectrum: Tensor, flush: bool) -> Tensor:
        """Final samples of this call's spectrum frames, the tail of the previous call added."""
        istft = self.decoder.head.istft
        signal, envelope = istft.overlap_add(istft.frames(spectrum))
        overlap = N_FFT - HOP_LENGTH
        signal[:, :overlap] += self._signal_tail
        envelope[:, :overlap] += self._envelope_tail
        if flush:
            final = signal.shape[-1] - N_FFT // 2
        else:
            final = signal.shape[-1] - overlap
            self._signal_tail, self._envelope_tail = signal[:, final:], envelope[:, final:]
        start = min(self._still_to_trim, final)
        self._still_to_trim -= start
        return signal[0, start:final] / envelope[0, start:final]


@torch.inference_mode()
def decode_streams(
    streams: Sequence[StreamingDecoder], flushes: Sequence[bool] | None = None
) -> list[Tensor]:
    """Run the pending frames of several streams through their decoder in one pass.

    A stream that is `due` gets its next chunk; one flushed (its sentence ended) gets all its
    remaining samples and starts over. The frame-mixing convolutions and the iSTFT run per
    stream; the channel MLPs and the head, which read the decoder's weights, take the frames of
    every stream as the rows of one product, so many streams cost little more than one. Each
    stream's samples are the bits it would get decoded alone.
    """
    flushes = [False] * len(streams) if flushes is None else list(flushes)
    # A stream flushed before any frame came has nothing to decode, only what it holds.
    empty = [
        flush and stream._frames_in == 0 for stream, flush in zip(streams, flushes, strict=True)
    ]
    working = [i for i, nothing in enumerate(empty) if not nothing]
    decoded = iter(_decode_together([streams[i] for i in working], [flushes[i] for i in working]))
    return [
        stream._take(stream._ready.new_zeros(0), True) if nothing else next(decoded)
        for stream, nothing in zip(streams, empty, strict=True)
    ]


def _decode_together(streams: Sequence[StreamingDecoder], flushes: Sequence[bool]) -> list[Tensor]:
    if not streams:
        return []
    decoder = streams[0].decoder
    if any(stream.decoder is not decoder for stream in streams):
        raise ValueError("streams decoded together must share one decoder")
    backbone = decoder.decoder
    xs = [stream._upsample_pending() for stream in streams]
    for index, (stage, context) in enumerate(backbone.stages()):
        windows = [
            stream._window(index, context, x, flush)
            for stream, x, flush in zip(streams, xs, flushes, strict=True)
        ]
        if isinstance(stage, ConvNeXtBlock):
            xs = _blocks_together(stage, windows)
        else:
            empty = _no_frames(decoder.dim, decoder.device)
            xs = [empty if window is None else stage(window) for window in windows]
    rows = torch.cat([x[0] for x in xs])
    projected = decoder.head.out(backbone.final_layer_norm(rows))
    # exp and polar run per stream: their vectorised loops' tails depend on the tensor's size.
    return [
        stream._take(stream._overlap_add(ISTFTHead.polar(part[None]), flush), flush)
        for stream, part, flush in zip(
            streams, projected.split([x.shape[1] for x in xs]), flushes, strict=True
        )
    ]


def _no_frames(width: int, device: torch.device) -> Tensor:
    """What a stage yields for a stream whose window holds no new frame: [1, 0, width]."""
    return torch.zeros(1, 0, width, device=device)


def _blocks_together(block: ConvNeXtBlock, windows: Sequence[Tensor | None]) -> list[Tensor]:
    """One ConvNeXt block on several streams' windows, all their rows at once.

    The windows are joined end to end and convolved as one; the rows whose taps reach across
    two streams are dropped, and the others are each stream's own frames, with the bits of
    its window alone (the conv is a product and a sum per tap, row by row). The residual and
    the channel MLP then take the kept rows together.
    """
    empty = _no_frames(len(block.gamma), block.gamma.device)
    present = [window[0] for window in windows if window is not None]
    if not present:
        return [empty for _ in windows]
    joined = torch.cat(present)
    sizes = [len(window) - 2 * block.context for window in present]
    starts = itertools.accumulate((len(window) for window in present[:-1]), initial=0)
    kept = torch.tensor(
        [
            row
            for start, size in zip(starts, sizes, strict=True)
            for row in range(start, start + size)
        ],
        device=joined.device,
    )
    convolved = block.depthwise(joined[None])[0].index_select(0, kept)
    mixed = joined.index_select(0, kept + block.context) + block.channel_mlp(convolved, sizes)
    frames = iter(mixed.split(sizes))
    return [empty if window is None else next(frames)[None] for window in windows]


def _lookahead_tokens(decoder: SopranoDecoder) -> int:
    """Tokens that must follow a token's segment before all its samples are final.

    After n tokens there are 4·(n−1)+1 upsampled frames; the backbone has finished all but its
    last `context` of them, and the overlap-add HOP samples per finished frame, less the N_FFT/2
    trimmed at the start. That covers all segments but those of the last tokens counted here
    (4 for both published variants, which is RECEPTIVE_FIELD).
    """
    late_samples = HOP_LENGTH * (UPSAMPLE_FACTOR - 1 + decoder.decoder.context) + N_FFT // 2
    return math.ceil(late_samples / TOKEN_SAMPLES)
