"""Whether other processes competed for the CPU: a real competing process, measured from ``/proc``."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from gms_deploy.machine_load import MachineLoad


def _spin(cpu_seconds: float) -> None:
    """Busy for this much of this process's CPU time, however long a loaded machine takes to give it."""
    end = time.process_time() + cpu_seconds
    while time.process_time() < end:
        pass


def test_a_competing_process_marks_the_machine_busy() -> None:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # past its start-up
        load = MachineLoad(threads=os.cpu_count() or 1)
        with load.measure():
            time.sleep(1.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert load.other_cores is not None and load.other_cores > 0.6
    assert load.busy is True
    record = load.to_json()
    assert record["machine_busy"] is True and record["cpu_load"]["other_processes_cores"] > 0.6
    assert f"of {load.cores} cores busy" in (load.warning() or "")


def test_own_work_is_not_counted_as_competition() -> None:
    """This process spinning is what it measures, not load; intervals add up. Whatever else runs
    on the machine (a CI neighbour) counts the same while this process idles as while it spins."""
    idle = MachineLoad(threads=1)
    with idle.measure():
        time.sleep(1.2)
    load = MachineLoad(threads=1)
    for _ in range(2):
        with load.measure():
            _spin(0.6)
    assert load.own_cpu_s > 1.1 and load.seconds > load.own_cpu_s - 0.05
    assert idle.other_cores is not None and load.other_cores is not None
    assert load.other_cores < idle.other_cores + 0.5  # counted, the spin would add a whole core


@pytest.mark.parametrize(("threads", "busy"), [(2, True), (1, False)])
def test_only_load_beyond_the_free_cores_competes(threads: int, busy: bool) -> None:
    """One core of two kept busy for a second: competition for two threads, none for one."""
    load = MachineLoad(threads=threads, cores=2, seconds=1.0, busy_cpu_s=1.9, own_cpu_s=0.9)
    assert load.other_cores == pytest.approx(1.0) and load.busy is busy
    assert (load.warning() is None) is not busy
