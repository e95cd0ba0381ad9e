"""Whether other processes competed for the CPU: a real competing process, measured from ``/proc``."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from gms_deploy.machine_load import MachineLoad


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
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
    """This process spinning is what it measures, not load; intervals add up."""
    load = MachineLoad(threads=1)
    for _ in range(2):
        with load.measure():
            _spin(0.6)
    assert 1.1 < load.seconds < 3.0 and load.own_cpu_s > 0.8
    assert load.other_cores is not None and load.other_cores < load.own_cpu_s / load.seconds


@pytest.mark.parametrize(("threads", "busy"), [(2, True), (1, False)])
def test_only_load_beyond_the_free_cores_competes(threads: int, busy: bool) -> None:
    """One core of two kept busy for a second: competition for two threads, none for one."""
    load = MachineLoad(threads=threads, cores=2, seconds=1.0, busy_cpu_s=1.9, own_cpu_s=0.9)
    assert load.other_cores == pytest.approx(1.0) and load.busy is busy
    assert (load.warning() is None) is not busy
