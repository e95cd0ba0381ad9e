"""How much CPU other processes took while a benchmark timed: whether its ratios can be trusted.

Load that comes and goes does not slow backends alike (PyTorch's busy-waiting OpenMP threads lose
most to a competing process), so a speed-up measured beside another job can be off several-fold.
Interleaved rounds cancel slow drifts, not that; the benchmark can only say that it happened.
The figure is the machine's busy CPU time less this process's own, from ``/proc``. It counts as
competition only beyond the cores the thread budget leaves free: a process spinning on one core of
two leaves a one-thread benchmark's ratios alone (the README has the figures).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUSY_CORES_MIN = 0.25
"""Other processes using this many more cores than the budget leaves free (or a tenth of the
machine's, if more) make the machine busy."""
BUSY_SHARE = 0.1


def _cpu_seconds() -> tuple[float, float] | None:
    """(every CPU's non-idle seconds, this process's user + system seconds); None without ``/proc``."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        own = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    # /proc/self/stat after the name: state is field 3, utime and stime fields 14 and 15.
    return (user + nice + system + irq + softirq + steal) / ticks, (int(own[11]) + int(own[12])) / ticks


@dataclass
class MachineLoad:
    """CPU use summed over the intervals measured (``measure``), in cores on average."""

    threads: int
    """The benchmark's thread budget: other processes may use the rest of the cores unnoticed."""
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    seconds: float = 0.0
    busy_cpu_s: float = 0.0
    own_cpu_s: float = 0.0
    readable: bool = True

    @contextmanager
    def measure(self) -> Iterator[None]:
        before, start = _cpu_seconds(), time.perf_counter()
        try:
            yield
        finally:
            after = _cpu_seconds()
            if before is None or after is None:
                self.readable = False
            else:
                self.seconds += time.perf_counter() - start
                self.busy_cpu_s += after[0] - before[0]
                self.own_cpu_s += after[1] - before[1]

    @property
    def other_cores(self) -> float | None:
        """Cores other processes kept busy on average; None where ``/proc`` could not be read."""
        if not self.readable or self.seconds <= 0:
            return None
        return max(0.0, self.busy_cpu_s - self.own_cpu_s) / self.seconds

    @property
    def busy(self) -> bool | None:
        other = self.other_cores
        return None if other is None else other - self.free_cores > self.margin

    @property
    def free_cores(self) -> int:
        return max(0, self.cores - self.threads)

    @property
    def margin(self) -> float:
        return max(BUSY_CORES_MIN, BUSY_SHARE * self.cores)

    def to_json(self) -> dict[str, Any]:
        other = self.other_cores
        return {
            "machine_busy": self.busy,
            "cpu_load": {
                "cores": self.cores,
                "other_processes_cores": None if other is None else round(other, 3),
                "this_process_cores": round(self.own_cpu_s / self.seconds, 3) if self.seconds else None,
                "seconds_measured": round(self.seconds, 3),
                "threads": self.threads,
                "busy_above_cores": self.free_cores + self.margin,
                "load_average": list(os.getloadavg()),
                "source": "/proc/stat less /proc/self/stat, over the timed rounds only",
            },
        }

    def warning(self) -> str | None:
        """One line for the user where the ratios are not to be trusted, else None."""
        if self.busy is None:
            return "cannot read /proc/stat: whether other processes competed for the CPU is unknown"
        if not self.busy:
            return None
        return (
            f"other processes kept {self.other_cores:.2f} of {self.cores} cores busy while timing, with "
            f"{self.threads} threads asked for: the latencies and speed-ups are not trustworthy; rerun "
            "on a quiet machine, or with fewer --threads"
        )
