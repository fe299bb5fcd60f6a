"""Compute threads that fit the cores other processes leave free.

torch starts one OpenMP thread per core, and a thread that finishes its share of an operation spin-waits for the
others. When another busy process holds one of the cores, the waits stretch to the scheduler's time slices, and a
step slows down far more than the lost core explains (`benchmarks/bench_threads.py`, `docs/figures.md`).
`fit_threads` sets torch's thread count to the cores this process may use (its affinity mask, which `taskset` and
container cpusets narrow) less those other processes keep busy; the training recipes call it at the start and every
`FIT_EVERY_STEPS` steps, `evaluate.py` before each batch and `mg2 generate` before it generates. A changed count
changes floating-point rounding, so runs are bit-identical only at a fixed count. It never raises the count above what torch started
with, so `OMP_NUM_THREADS` or `torch.set_num_threads` stay the ceiling.
"""

from __future__ import annotations

import os
import time

import torch

FIT_EVERY_STEPS = 25
_ceiling: int | None = None


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def runnable_elsewhere(loadavg: str, own_states: list[str]) -> int:
    """Runnable threads of other processes: `/proc/loadavg`'s running count less this process's threads in state R."""
    running = int(loadavg.split()[3].split("/")[0])
    return max(0, running - sum(state == "R" for state in own_states))


def _own_thread_states() -> list[str]:
    states = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat") as handle:
                states.append(handle.read().rsplit(")", 1)[1].split()[0])
        except OSError:  # the thread ended between the listing and the read
            continue
    return states


def busy_elsewhere(samples: int = 5, interval_s: float = 0.01) -> float:
    """Threads of other processes that want a core, averaged over `samples` reads; 0 where there is no `/proc`."""
    counts = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as handle:
                counts.append(runnable_elsewhere(handle.read(), _own_thread_states()))
        except OSError:
            return 0.0
        time.sleep(interval_s)
    return sum(counts) / len(counts)


def fit_threads() -> int:
    """Set torch's intra-op threads to the usable cores other processes leave free (at least 1, at most the count
    torch started with); returns the count."""
    global _ceiling
    if _ceiling is None:
        _ceiling = torch.get_num_threads()
    threads = max(1, min(_ceiling, usable_cores() - round(busy_elsewhere())))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads
