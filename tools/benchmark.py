"""Side-by-side speed of the LM backends on a full-size random checkpoint (`script/benchmark`).

Each backend lives in its own worker process, so its peak memory is its own and the workers never
compete for the CPU: the parent sends one task at a time, round-robin over the backends, and
reports the median of the repeats. The checkpoint has the real Soprano-1.1-80M dimensions, random
weights and a silent [STOP] row, so every sentence runs exactly to its token limit.

    script/benchmark [--repeats 3] [--backends transformers,native,native:dtype=int8] [--json]

A column may also build the kernels for another target: `native:march=haswell` sets
SOPRANO_KERNELS_MARCH in its worker (AVX2 on an AVX-512 machine, side by side). The table names
the kernel build each column ran.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

# soprano before torch: its thread defaults (soprano.cpu.threads) must reach libgomp, which reads
# them when torch loads it, in every worker too, so that each column runs as users run it.
import soprano  # noqa: F401  # isort: skip

import torch

from soprano.constants import SAMPLE_RATE, TOKEN_SAMPLES, TOKENS_PER_SECOND
from soprano.cpu import kernels

CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache" / "benchmark"
DEFAULT_BACKENDS = "transformers,native,native:dtype=int8"
ACCURACY_VARIANTS = (
    "native",
    "native:kernels=0",
    "native:kernels=0;half_weights=0",
    "native:dtype=bfloat16",
    "native:dtype=int8",
)

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs all the way back home."
PARAGRAPH = (
    "Soprano is a small text to speech model that runs quickly on an ordinary computer. "
    "It reads each sentence of a text, and it turns the words into sound one piece at a time. "
    "Short answers come back almost at once. "
    "Longer texts are split into sentences, and all of them are generated together in a batch. "
    "The audio of every sentence is joined in order, without gaps or clicks. "
    "This paragraph has six sentences, which is typical for a spoken reply."
)
BATCH_SIZES = (1, 4, 16)
STEP_BATCH_SIZES = (1, 16)
INFER_BATCH_TEXTS = 16
"""Texts of one sentence each that `infer_batch` gets at once (as many as a serving step holds)."""


@dataclass(frozen=True)
class Settings:
    lm_tokens: int
    """Tokens per sequence in the LM measurements."""
    sentence_tokens: int
    """Tokens per sentence end to end (the checkpoint never stops early)."""
    decoder_tokens: int


@dataclass(frozen=True)
class Task:
    kind: str
    """'lm', 'step', 'decoder', 'e2e', 'batch', 'stream' or 'ttfa'."""
    label: str
    arg: Any = None


def tasks(settings: Settings) -> list[Task]:
    return [
        *(Task("lm", f"LM tokens/s, {n} sequence{'s' * (n > 1)}", n) for n in BATCH_SIZES),
        *(
            Task("step", f"LM decode step, {n} sequence{'s' * (n > 1)} (ms)", n)
            for n in STEP_BATCH_SIZES
        ),
        Task("decoder", f"decoder × real time ({settings.decoder_tokens} tokens)"),
        Task("e2e", "infer × real time, one sentence", SENTENCE),
        Task("e2e", "infer × real time, paragraph (6 sentences)", PARAGRAPH),
        Task(
            "batch",
            f"infer_batch × real time, {INFER_BATCH_TEXTS} sentences",
            [SENTENCE] * INFER_BATCH_TEXTS,
        ),
        Task("stream", "infer_stream × real time, one sentence", SENTENCE),
        Task("ttfa", "infer_stream time to first audio, one sentence (ms)", SENTENCE),
    ]


def ensure_checkpoint(tokenizer: Path | None = None) -> Path:
    """Build the full-size random checkpoint once (with `tokenizer`, e.g. the published one,
    instead of the character-level one: its own folder, the same weights); later runs reuse it."""
    from soprano.testing.make_checkpoint import make_checkpoint

    name = "soprano-1.1-80m-random"
    if tokenizer is not None:
        name += "-" + hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest()[:12]
    folder = CACHE_DIR / name
    if not (folder / "decoder.pth").is_file():
        partial = folder.with_name(folder.name + ".partial")
        make_checkpoint(partial, size="full", seed=0, stop_scale=0.0, tokenizer=tokenizer)
        partial.rename(folder)
    return folder


MARCH_OPTION = "march"
"""A column's option that is the benchmark's, not the backend's: its kernels' -march target."""


def parse_backend(spec: str) -> tuple[str, dict[str, Any]]:
    """'native:dtype=int8;threads=1' → ('native', {'dtype': 'int8', 'threads': 1})."""
    name, _, raw = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, raw.split(";")):
        key, _, value = item.partition("=")
        options[key] = int(value) if value.isdigit() else value
    return name, options


def worker(
    spec: str,
    checkpoint: str,
    device: str,
    threads: int | None,
    settings: Settings,
    pipe: Connection,
    torch_threads: int | None = None,
) -> None:
    """Load one backend, then run the tasks the parent sends until it sends None. `threads` is
    torch's count before loading (what --threads sets, and so the native backend's default);
    `torch_threads` overrides torch's count once the backend is loaded."""
    from soprano.tts import SopranoTTS

    logging.getLogger("soprano").setLevel(logging.ERROR)  # every benchmark sentence is cut
    if threads is not None:
        torch.set_num_threads(threads)
    name, options = parse_backend(spec)
    march = options.pop(MARCH_OPTION, None)
    if march is not None:
        os.environ[kernels.MARCH] = str(march)
    tts = SopranoTTS(
        backend=name, device=device, model_path=checkpoint, warmup=False, backend_options=options
    )
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    tts.infer("Hello world!", max_new_tokens=8)
    runners = _runners(tts, settings) | _contention_runners(tts, settings)
    pipe.send(("ready", kernel_build(tts)))
    try:
        while (task := pipe.recv()) is not None:
            pipe.send(runners[task.kind](task.arg))
    except EOFError:  # the parent is gone
        return
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if tts.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    pipe.send(peak)


def kernel_build(tts: Any) -> str:
    """Which kernel build a worker's engine runs (ISA, compiler, flags, threads), if any."""
    built = kernels.cpu_kernels() if tts.device.type == "cpu" else None
    if built is None:
        return "none (PyTorch path)"
    lm_model = getattr(tts.lm, "model", None)
    lm = "LM and decoder" if getattr(lm_model, "compiled", None) is not None else "decoder"
    return f"{kernels.describe(kernels.build_info(built))} ({lm})"


def _runners(tts: Any, settings: Settings) -> dict[str, Callable[[Any], float]]:
    from soprano.lm import SamplingParams

    prompt = tts.tokenizer.encode(SENTENCE)
    frames = torch.randn(settings.decoder_tokens, tts.checkpoint.config.hidden_size)
    frames = frames.to(tts.device)

    def lm(batch: int) -> float:
        params = SamplingParams(max_new_tokens=settings.lm_tokens)
        start = time.perf_counter()
        generations = tts.lm.generate([prompt] * batch, params)
        elapsed = time.perf_counter() - start
        assert all(len(g.tokens) == settings.lm_tokens for g in generations)
        return batch * settings.lm_tokens / elapsed

    def step(batch: int) -> float:
        """Median time between two steps of `stream`: the decode step without the prompt."""
        params = SamplingParams(max_new_tokens=settings.lm_tokens)
        times = [time.perf_counter() for _ in tts.lm.stream([prompt] * batch, params)]
        return statistics.median(b - a for a, b in itertools.pairwise(times)) * 1000

    def decoder(_: None) -> float:
        start = time.perf_counter()
        (audio,) = tts.decoder.decode([frames])
        audio.cpu()
        return len(audio) / SAMPLE_RATE / (time.perf_counter() - start)

    def e2e(text: str) -> float:
        start = time.perf_counter()
        audio = tts.infer(text, max_new_tokens=settings.sentence_tokens)
        return len(audio) / SAMPLE_RATE / (time.perf_counter() - start)

    def batch(texts: list[str]) -> float:
        start = time.perf_counter()
        audios = tts.infer_batch(texts, max_new_tokens=settings.sentence_tokens)
        return sum(len(audio) for audio in audios) / SAMPLE_RATE / (time.perf_counter() - start)

    def stream(text: str) -> float:
        """Streaming throughput: every chunk decoded on its own, as the Wyoming server does."""
        start = time.perf_counter()
        samples = sum(
            len(chunk) for chunk in tts.infer_stream(text, max_new_tokens=settings.sentence_tokens)
        )
        return samples / SAMPLE_RATE / (time.perf_counter() - start)

    def ttfa(text: str) -> float:
        start = time.perf_counter()
        chunks = tts.infer_stream(text, max_new_tokens=settings.sentence_tokens)
        next(chunks)
        elapsed = time.perf_counter() - start
        chunks.close()
        return elapsed * 1000

    return {
        "lm": lm,
        "step": step,
        "decoder": decoder,
        "e2e": e2e,
        "batch": batch,
        "stream": stream,
        "ttfa": ttfa,
    }


def run(
    backends: list[str],
    device: str,
    threads: int | None,
    repeats: int,
    settings: Settings,
    log: Callable[[str], None],
) -> dict[str, Any]:
    checkpoint = ensure_checkpoint()
    load_before = os.getloadavg()[0]
    context = multiprocessing.get_context("spawn")
    pipes: dict[str, Connection] = {}
    processes = []
    for spec in backends:
        pipes[spec], process = start_worker(context, spec, checkpoint, device, threads, settings)
        processes.append(process)
    builds = await_workers(pipes, log)
    results: dict[str, dict[str, list[float]]] = {spec: {} for spec in backends}
    for repeat in range(repeats):
        for task in tasks(settings):
            for spec, pipe in pipes.items():
                pipe.send(task)
                results[spec].setdefault(task.label, []).append(pipe.recv())
        log(f"repeat {repeat + 1}/{repeats} done")
    peaks = {}
    for spec, pipe in pipes.items():
        pipe.send(None)
        peaks[spec] = pipe.recv()
    for process in processes:
        process.join()
    medians = _medians(results)
    memory_label = "peak memory (MiB, " + ("GPU" if device.startswith("cuda") else "RSS") + ")"
    for spec in backends:
        medians[spec][memory_label] = peaks[spec]
    load = {"load_before": load_before, "load_after": os.getloadavg()[0]}
    return {
        "machine": machine(threads) | load,
        "command": " ".join(["script/benchmark", *sys.argv[1:]]),
        "settings": settings.__dict__ | {"repeats": repeats, "device": device},
        "backends": backends,
        "kernels": builds,
        "medians": medians,
        "samples": results,
    }


def start_worker(
    context: Any,
    spec: str,
    checkpoint: Path,
    device: str,
    threads: int | None,
    settings: Settings,
    torch_threads: int | None = None,
) -> tuple[Connection, Any]:
    """A worker process for the column `spec`, started with this process's environment; its
    pipe and the process."""
    parent, child = context.Pipe()
    process = context.Process(
        target=worker,
        args=(spec, str(checkpoint), device, threads, settings, child, torch_threads),
        daemon=True,
    )
    process.start()
    return parent, process


def _medians(results: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {
        column: {label: statistics.median(values) for label, values in by_task.items()}
        for column, by_task in results.items()
    }


def await_workers(pipes: dict[str, Connection], log: Callable[[str], None]) -> dict[str, str]:
    """Wait for every worker to load; returns each one's kernel build."""
    builds = {}
    for name, pipe in pipes.items():
        message = pipe.recv()
        if not (isinstance(message, tuple) and message[0] == "ready"):
            raise RuntimeError(f"worker for {name} did not start")
        builds[name] = message[1]
        log(f"loaded {name}: kernels {builds[name]}")
    return builds


def machine(threads: int | None) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": threads or torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def table(report: dict[str, Any]) -> str:
    """Markdown: one row per measurement, one column per backend, ratios to the first column."""
    backends = report["backends"]
    medians = report["medians"]
    labels = list(medians[backends[0]])
    lower_is_better = ("ms)", "MiB")
    lines = [
        "| measurement | " + " | ".join(backends) + " |",
        "|---|" + "---:|" * len(backends),
    ]
    for label in labels:
        base = medians[backends[0]][label]
        cells = []
        for spec in backends:
            value = medians[spec][label]
            cell = f"{value:.0f}" if value >= 100 else f"{value:.1f}"
            if spec != backends[0] and base and value:
                ratio = base / value if label.endswith(lower_is_better) else value / base
                cell += f" ({ratio:.1f}×)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    settings = report["settings"]
    m = report["machine"]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads"
        + (f", {m['cuda']}" if m["cuda"] else "")
        + f"; device {settings['device']}; load average {m['load_before']:.1f} before, "
        + f"{m['load_after']:.1f} after. Medians of {settings['repeats']} interleaved runs; "
        + f"LM {settings['lm_tokens']} tokens per sequence, infer {settings['sentence_tokens']} "
        + f"tokens per sentence ({settings['sentence_tokens'] / TOKENS_PER_SECOND:.1f} s of "
        + f"audio); 1 s of audio = {TOKENS_PER_SECOND} tokens = {SAMPLE_RATE} samples "
        + f"({TOKEN_SAMPLES} per token). Ratios (×) against {backends[0]}, higher is better.",
        f"Command: {report['command']}",
        "Kernels:",
        *(f"- {spec}: {build}" for spec, build in report["kernels"].items()),
    ]
    return "\n".join(lines)


@torch.inference_mode()
def accuracy(device: str, tokens: int, variants: list[str]) -> dict[str, Any]:
    """What each native option computes, against the transformers backend in fp32 (greedy).

    Free-running: how many sentences give the same tokens, and how far they agree. Teacher-forced
    (everyone reads the reference tokens): the error of the hidden states that feed the decoder,
    and how often the top logit agrees. The decoder that the option brings (on CPU kernels: bf16
    or int8 weights) against the exact PyTorch decoder, both fed the reference states.
    """
    from soprano.checkpoint import Checkpoint
    from soprano.decoder import SopranoDecoder
    from soprano.device import select_device
    from soprano.lm import SamplingParams
    from soprano.lm.native import NativeLM
    from soprano.lm.transformers import TransformersLM
    from soprano.text import prepare_text
    from soprano.tokenizer import PromptTokenizer
    from soprano.tts import store_decoder_weights

    checkpoint = Checkpoint.from_folder(ensure_checkpoint())
    torch_device = select_device(device)
    tokenizer = PromptTokenizer(checkpoint.tokenizer_path)
    prompts = [tokenizer.encode(sentence) for sentence in prepare_text(PARAGRAPH)]
    params = SamplingParams(max_new_tokens=tokens)
    reference = TransformersLM(checkpoint, torch_device)
    expected = reference.generate(prompts, params)
    expected_top = [reference.model.lm_head(g.hidden).argmax(-1).tolist() for g in expected]
    decoder_state = checkpoint.load_decoder_state()
    exact_decoder = SopranoDecoder.from_state_dict(decoder_state).to(torch_device)
    expected_audio = torch.cat(exact_decoder.decode([g.hidden for g in expected]))
    results: dict[str, Any] = {}
    for spec in variants:
        _, options = parse_backend(spec)
        lm = NativeLM(checkpoint, torch_device, **options)
        decoder = SopranoDecoder.from_state_dict(decoder_state).to(torch_device)
        store_decoder_weights(decoder, torch_device, options)
        audio_error = torch.cat(decoder.decode([g.hidden for g in expected])) - expected_audio
        generated = lm.generate(prompts, params)
        prefixes = [
            _common_prefix(mine.tokens, theirs.tokens) / len(theirs.tokens)
            for mine, theirs in zip(generated, expected, strict=True)
        ]
        states = [
            _teacher_forced_states(lm, prompt, g.tokens)
            for prompt, g in zip(prompts, expected, strict=True)
        ]
        reference_states = torch.cat([g.hidden for g in expected])
        error = torch.cat(states).float() - reference_states
        top = [lm.model.logits(h).argmax(-1).tolist() for h in states]
        agree = sum(
            a == b
            for mine, theirs in zip(top, expected_top, strict=True)
            for a, b in zip(mine, theirs, strict=True)
        )
        results[spec] = {
            "identical sentences": f"{sum(p == 1 for p in prefixes)}/{len(prompts)}",
            "agreeing prefix (mean)": statistics.mean(prefixes),
            "top token agreement (teacher-forced)": agree / len(reference_states),
            "hidden max abs error": error.abs().max().item(),
            "hidden relative RMS error": (error.norm() / reference_states.norm()).item(),
            "decoder audio relative RMS error (same states)": (
                audio_error.norm() / expected_audio.norm()
            ).item(),
        }
    built = kernels.cpu_kernels() if torch_device.type == "cpu" else None
    return {
        "machine": machine(None),
        "command": " ".join(["script/benchmark", *sys.argv[1:]]),
        "settings": {"sentences": len(prompts), "tokens": tokens, "device": device},
        "kernels": "none" if built is None else kernels.describe(kernels.build_info(built)),
        "variants": results,
    }


def _common_prefix(first: list[int], second: list[int]) -> int:
    return next(
        (i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b),
        min(len(first), len(second)),
    )


def _teacher_forced_states(lm: Any, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """States producing each of `tokens` when the LM reads prompt + tokens in one pass."""
    ids = torch.tensor(prompt + tokens[:-1], device=lm.device)
    hidden = lm.model(ids, [lm.model.new_cache(len(ids))], [len(ids)])
    return hidden[len(prompt) - 1 :]


def accuracy_table(report: dict[str, Any]) -> str:
    variants = report["variants"]
    labels = list(next(iter(variants.values())))
    lines = [
        "| vs transformers fp32 | " + " | ".join(variants) + " |",
        "|---|" + "---:|" * len(variants),
    ]
    for label in labels:
        cells = [_format(variants[spec][label]) for spec in variants]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    settings = report["settings"]
    lines += [
        "",
        f"{settings['sentences']} sentences × {settings['tokens']} greedy tokens on the "
        "full-size random checkpoint; a trained model's peaked distributions make top-token "
        "ties rarer, so these agreement figures are pessimistic.",
        f"Command: {report['command']}",
        f"Kernels: {report['kernels']}",
    ]
    return "\n".join(lines)


def _format(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value == 0 or abs(value) >= 0.01:
        return f"{value:.3f}"
    return f"{value:.1e}"


# ---------------------------------------------------------------------------------------------
# Contention (`script/benchmark --contention`): the engine next to other CPU-bound processes, as
# on a Home Assistant box shared with add-ons. OpenMP reads its variables once, when libgomp
# loads (at torch's import), so every thread setting runs in a worker process of its own that
# starts with its environment; the competitors are busy loops that this benchmark starts and
# always stops.

OPENMP_LOOPS = "SOPRANO_OPENMP_LOOPS"
"""Set: the kernels run their loops on OpenMP's threads instead of their own pool (as before)."""
OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", OPENMP_LOOPS)
"""A worker starts with these unset, but for its setting's own."""
LIBGOMP_DEFAULT_WAIT = {"GOMP_SPINCOUNT": "300000"}
"""libgomp's own wait without OMP_WAIT_POLICY (spin 300,000 times, some ms, then sleep), what
Soprano ran with before it chose; set explicitly, as Soprano keeps whatever a user sets."""
COMPETITOR_LOADS = (0, 1, 2)
COMPETITOR_LIFETIME = 3600.0
"""Seconds after which a competitor ends by itself, should the benchmark die without stopping
it (it stops them after every block of tasks, and on any error)."""
BUSY_LOOP = (
    "import sys, time\n"
    "end = time.monotonic() + float(sys.argv[1])\n"
    "print('spinning', flush=True)\n"
    "while time.monotonic() < end:\n"
    "    pass\n"
)
SERVED_FIRST_AUDIO = "serving layer, time to first audio (ms)"
SERVED_RATE = "serving layer, audio s per s"
SUSTAINED_SENTENCES = 4
"""A process that has just woken gets the scheduler's favour over the busy loops for a moment
(Linux credits a sleeper); one that keeps working for seconds does not: both cases are real
(a short reply, a long text)."""
CONTENTION_TASKS = (
    Task("e2e", "infer × real time, one sentence", SENTENCE),
    Task(
        "sustained",
        f"infer × real time, {SUSTAINED_SENTENCES} sentences one after another",
        SENTENCE,
    ),
    Task("ttfa", "infer_stream time to first audio (ms)", SENTENCE),
    Task("stream", "infer_stream audio s per s (a chunk per token)", SENTENCE),
    Task("served", "serving layer", SENTENCE),
)


@dataclass(frozen=True)
class ThreadSetting:
    label: str
    threads: int | None
    """The native backend's `threads` option (None: its default)."""
    environment: dict[str, str]
    """OpenMP variables of its worker process (the others of OPENMP_VARIABLES unset)."""
    torch_threads: int | None = None
    """PyTorch's own count once the engine is loaded (None: what the backend chose)."""

    @property
    def spec(self) -> str:
        return "native" if self.threads is None else f"native:threads={self.threads}"


def thread_settings() -> list[ThreadSetting]:
    """One thread; one per core with the kernels' loops on OpenMP's threads (as before) or on
    their own pool, each with libgomp's own wait and with the passive one, PyTorch's operators
    on every core; and Soprano's default: the pool, passive, PyTorch's operators on one."""
    from soprano.cpu.threads import OPENMP_DEFAULTS

    cores = len(os.sched_getaffinity(0))  # what libgomp counts: a taskset limits it
    defaults = ", ".join(f"{name}={value}" for name, value in OPENMP_DEFAULTS.items())
    openmp_loops = {OPENMP_LOOPS: "1"}
    return [
        ThreadSetting("1 thread", 1, LIBGOMP_DEFAULT_WAIT),
        ThreadSetting(
            f"{cores} threads, OpenMP loops, libgomp's default wait (before)",
            cores,
            openmp_loops | LIBGOMP_DEFAULT_WAIT,
        ),
        ThreadSetting(
            f"{cores} threads, OpenMP loops, {defaults}",
            cores,
            openmp_loops | dict(OPENMP_DEFAULTS),
        ),
        ThreadSetting(
            f"{cores} threads, the kernels' pool, libgomp's default wait",
            cores,
            LIBGOMP_DEFAULT_WAIT,
            torch_threads=cores,
        ),
        ThreadSetting(
            f"{cores} threads, the kernels' pool, {defaults}, PyTorch's operators on {cores}",
            cores,
            dict(OPENMP_DEFAULTS),
            torch_threads=cores,
        ),
        ThreadSetting(
            f"Soprano's default: {cores} threads, the kernels' pool, {defaults}, "
            "PyTorch's operators on 1",
            None,
            dict(OPENMP_DEFAULTS),
        ),
    ]


@contextlib.contextmanager
def competitors(
    count: int, lifetime: float = COMPETITOR_LIFETIME
) -> Iterator[list[subprocess.Popen[str]]]:
    """`count` CPU-bound processes, each spinning for at most `lifetime` seconds and running
    when this yields; on leaving, whatever happened, they are killed and reaped."""
    processes: list[subprocess.Popen[str]] = []
    try:
        for _ in range(count):
            process = subprocess.Popen(
                [sys.executable, "-c", BUSY_LOOP, str(lifetime)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                text=True,
            )
            processes.append(process)
            assert process.stdout is not None
            if process.stdout.readline().strip() != "spinning":
                raise RuntimeError("a competitor process did not start")
        yield processes
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait()
            if process.stdout is not None:
                process.stdout.close()


@contextlib.contextmanager
def _openmp_environment(variables: dict[str, str]) -> Iterator[None]:
    """os.environ with exactly `variables` of OPENMP_VARIABLES set, restored on leaving: a
    spawned worker starts with the environment of the moment it is started."""
    saved = {name: os.environ.get(name) for name in OPENMP_VARIABLES}
    try:
        for name in OPENMP_VARIABLES:
            os.environ.pop(name, None)
        os.environ.update(variables)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _contention_runners(tts: Any, settings: Settings) -> dict[str, Callable[[Any], Any]]:
    """`served`: the sentence through the serving layer, the servers' path, whose engine thread
    is not the thread that loaded the model (so the process has two OpenMP thread teams).
    `sustained`: `infer` of the sentence SUSTAINED_SENTENCES times in a row."""
    from soprano.lm import SamplingParams
    from soprano.serving import SpeechService
    from soprano.text import prepare_text

    services: list[SpeechService] = []

    def served(text: str) -> dict[str, float]:
        if not services:
            services.append(SpeechService(tts))
        params = SamplingParams(max_new_tokens=settings.sentence_tokens)
        start = time.perf_counter()
        first, samples = 0.0, 0
        for chunk in services[0].submit(prepare_text(text), params):
            first = first or time.perf_counter() - start
            samples += len(chunk)
        rate = samples / SAMPLE_RATE / (time.perf_counter() - start)
        return {SERVED_FIRST_AUDIO: first * 1000, SERVED_RATE: rate}

    def sustained(text: str) -> float:
        start = time.perf_counter()
        samples = sum(
            len(tts.infer(text, max_new_tokens=settings.sentence_tokens))
            for _ in range(SUSTAINED_SENTENCES)
        )
        return samples / SAMPLE_RATE / (time.perf_counter() - start)

    return {"served": served, "sustained": sustained}


def _contention_worker(setup: ThreadSetting, task: Task) -> str:
    """Each setting runs the serving layer in a process of its own: once its engine thread has
    run, the process keeps a second OpenMP team, which would slow the engine's own tasks."""
    return f"{setup.label}: {'serving' if task.kind == 'served' else 'engine'}"


def run_contention(
    device: str, repeats: int, settings: Settings, log: Callable[[str], None]
) -> dict[str, Any]:
    """Every thread setting next to 0, 1 and 2 competitors, interleaved: per repeat and load,
    each setting runs each task in turn (the settings' order rotates from repeat to repeat);
    a setting's serving-layer task runs in a process of its own (`_contention_worker`)."""
    checkpoint = ensure_checkpoint()
    load_before = os.getloadavg()[0]
    context = multiprocessing.get_context("spawn")
    setups = thread_settings()
    pipes: dict[str, Connection] = {}
    processes = []
    results: dict[str, dict[str, list[float]]] = {setup.label: {} for setup in setups}
    try:
        for setup, task in itertools.product(setups, CONTENTION_TASKS):
            name = _contention_worker(setup, task)
            if name in pipes:
                continue
            with _openmp_environment(setup.environment):
                pipes[name], process = start_worker(
                    context, setup.spec, checkpoint, device, None, settings, setup.torch_threads
                )
            processes.append(process)
        await_workers(pipes, log)
        for repeat in range(repeats):
            order = setups[repeat % len(setups) :] + setups[: repeat % len(setups)]
            for load in COMPETITOR_LOADS:
                with competitors(load):
                    for setup, task in itertools.product(order, CONTENTION_TASKS):
                        pipe = pipes[_contention_worker(setup, task)]
                        pipe.send(task)
                        value = pipe.recv()
                        values = value if isinstance(value, dict) else {task.label: value}
                        for label, figure in values.items():
                            results[setup.label].setdefault(f"{label} | {load}", []).append(figure)
                log(f"repeat {repeat + 1}/{repeats}, {load} competing processes: done")
        for pipe in pipes.values():
            pipe.send(None)
            pipe.recv()
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    medians = _medians(results)
    return {
        "machine": machine(None) | {"load_before": load_before, "load_after": os.getloadavg()[0]},
        "command": " ".join(["script/benchmark", *sys.argv[1:]]),
        "settings": settings.__dict__ | {"repeats": repeats, "device": device},
        "thread_settings": {
            setup.label: {
                "threads": setup.threads,
                "environment": setup.environment,
                "torch_threads": setup.torch_threads,
            }
            for setup in setups
        },
        "medians": medians,
        "samples": results,
    }


def contention_table(report: dict[str, Any]) -> str:
    """Markdown: per measurement, one row per thread setting and one column per number of
    competing processes; (×) is the time taken against the former default's with none."""
    medians = report["medians"]
    labels = list(medians)
    baseline = labels[1]
    measurements = list(dict.fromkeys(key.rpartition(" | ")[0] for key in medians[baseline]))
    lines = []
    for measurement in measurements:
        lower_is_better = measurement.endswith("ms)")
        base = medians[baseline][f"{measurement} | 0"]
        lines += [
            f"| {measurement} | " + " | ".join(f"{n} busy" for n in COMPETITOR_LOADS) + " |",
            "|---|" + "---:|" * len(COMPETITOR_LOADS),
        ]
        for label in labels:
            cells = []
            for load in COMPETITOR_LOADS:
                value = medians[label][f"{measurement} | {load}"]
                slower = value / base if lower_is_better else base / value
                cells.append(f"{_figure(value)} ({slower:.1f}×)")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    settings = report["settings"]
    m = report["machine"]
    lines += [
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; load average "
        f"{m['load_before']:.1f} before, {m['load_after']:.1f} after. Medians of "
        f"{settings['repeats']} interleaved runs; one sentence of {settings['sentence_tokens']} "
        f'tokens ({settings["sentence_tokens"] / TOKENS_PER_SECOND:.1f} s of audio). "N busy": '
        "N single-threaded busy loops beside it. (×): the time it took against the time of "
        f'"{baseline}" with none (2.0× is twice as slow).',
        f"Command: {report['command']}",
    ]
    return "\n".join(lines)


def _figure(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backends",
        default=DEFAULT_BACKENDS,
        help="comma-separated; options after ':' joined by ';' (e.g. native:dtype=int8;threads=1;"
        "march=haswell, the last one building the column's kernels for that -march target)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per backend (default: torch's)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lm-tokens", type=int, default=96)
    parser.add_argument("--sentence-tokens", type=int, default=96)
    parser.add_argument("--decoder-tokens", type=int, default=128)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument(
        "--accuracy",
        action="store_true",
        help="instead of speed, measure what each native option computes against transformers",
    )
    parser.add_argument(
        "--contention",
        action="store_true",
        help="instead of the backends, the thread settings next to 0, 1 and 2 busy processes",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    settings = Settings(args.lm_tokens, args.sentence_tokens, args.decoder_tokens)
    if args.contention:
        report = run_contention(args.device, args.repeats, settings, log=_stderr)
        print(json.dumps(report, indent=2) if args.json else contention_table(report))
        return 0
    if args.accuracy:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        report = accuracy(args.device, args.lm_tokens, list(ACCURACY_VARIANTS))
        print(json.dumps(report, indent=2) if args.json else accuracy_table(report))
        return 0
    backends = [spec for spec in args.backends.split(",") if spec]
    for spec in backends:
        name, options = parse_backend(spec)
        options.pop(MARCH_OPTION, None)
        if options and name != "native":
            parser.error(f"only the native backend takes options: {spec}")
    report = run(backends, args.device, args.threads, args.repeats, settings, log=_stderr)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
