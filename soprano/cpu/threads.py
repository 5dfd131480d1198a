"""CPU threads on a machine shared with other work: OpenMP's wait policy and the `threads`
default, chosen here and nowhere else (docs/kernels.md, "Threads").

PyTorch and the compiled kernels run their parallel loops on libgomp's OpenMP threads. Without
OMP_WAIT_POLICY, libgomp lets a thread that waits (for the next loop, or at a loop's end for the
others) spin for about 3 ms before it sleeps. On a host whose cores other processes also use
(Home Assistant and its add-ons), a spinning thread burns the time slice that the thread it waits
for needs, and a step of the LM's ~70 parallel loops waits for a descheduled thread in every one
of them: next to one busy process, `infer` ran 28× slower. With OMP_WAIT_POLICY=PASSIVE waiting
threads sleep at once. libgomp reads these variables once, when it loads (at torch's import), so
`apply_openmp_defaults` runs when `soprano` is imported, before it imports torch.

Where the compiled kernels run the LM, `share_cores` gives their own pool the cores and leaves
PyTorch's operators (the decoder's convolutions and norms, the iSTFT) on the calling thread: a
streaming chunk alternates between the two dozens of times, and two teams of threads, one
spinning after its loop while the other's sleeping threads are woken, took turns on the same
cores (measured: docs/kernels.md, "Threads").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping
from types import ModuleType

_LOGGER = logging.getLogger(__name__)

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
"""How long OpenMP's waiting threads spin: a user who sets either one keeps both as they are."""
OPENMP_DEFAULTS: Mapping[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}
"""Soprano's choice where the user made none (measured: README, "Threads on a busy machine")."""


def apply_openmp_defaults(
    environ: MutableMapping[str, str] = os.environ, torch_loaded: bool = False
) -> dict[str, str]:
    """Set OPENMP_DEFAULTS in `environ` unless the user set a wait variable, or torch (and with
    it libgomp) is loaded already, so that setting them would change only child processes.
    Returns what it set."""
    if torch_loaded or any(name in environ for name in WAIT_VARIABLES):
        return {}
    environ.update(OPENMP_DEFAULTS)
    return dict(OPENMP_DEFAULTS)


def note_unset_wait_policy(environ: Mapping[str, str] = os.environ) -> bool:
    """Say (at info level) how to stop OpenMP's threads spinning where torch was imported before
    soprano, which therefore set nothing; returns whether it had to."""
    if any(name in environ for name in WAIT_VARIABLES):
        return False
    _LOGGER.info(
        "OpenMP's waiting threads spin (torch was imported before soprano): on a machine that "
        "runs other work, set OMP_WAIT_POLICY=PASSIVE before importing torch"
    )
    return True


def share_cores(kernels: ModuleType, threads: int | None = None) -> int:
    """Run the kernels' loops on `threads` threads (None keeps their count: at first torch's,
    one per core) and PyTorch's own operators on one, for the whole process; returns the count.
    With SOPRANO_OPENMP_LOOPS the loops run on torch's threads, which then keep the count."""
    # Here, not at the top: soprano imports this module before torch (see above).
    import torch

    count = kernels.threads() if threads is None else threads
    kernels.set_threads(count)
    torch.set_num_threads(count if kernels.OPENMP_LOOPS else 1)
    return count
