import subprocess
import sys

import pytest
import torch

from mg2_pipeline import threads


def test_runnable_elsewhere_counts_other_processes_threads_only():
    assert threads.runnable_elsewhere("0.50 0.40 0.30 3/512 1234", ["R", "S", "R"]) == 1
    assert threads.runnable_elsewhere("0.50 0.40 0.30 2/512 1234", ["R", "R", "S"]) == 0
    assert threads.runnable_elsewhere("0.50 0.40 0.30 1/512 1234", ["R", "R"]) == 0  # sampled a moment apart


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_busy_process_is_seen():
    # The competitor says when its busy loop starts: from then on it is runnable at every sample, however slow the
    # machine, so nothing here waits on the clock.
    competitor = subprocess.Popen(
        [sys.executable, "-c", "print('spinning', flush=True)\nwhile True: pass"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert competitor.stdout.readline().strip() == "spinning"
        assert threads.busy_elsewhere(samples=20) >= 0.5
    finally:
        competitor.kill()
        competitor.wait()


def test_the_reading_thread_is_counted_as_its_own():
    assert "R" in threads._own_thread_states()


def test_fit_threads_leaves_busy_cores_and_keeps_the_ceiling(monkeypatch):
    started_with = torch.get_num_threads()
    monkeypatch.setattr(threads, "_ceiling", 2)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    try:
        for busy, expected in [(0.0, 2), (0.4, 2), (1.0, 1), (3.0, 1), (0.0, 2)]:
            monkeypatch.setattr(threads, "busy_elsewhere", lambda: busy)
            assert threads.fit_threads() == expected == torch.get_num_threads()
        monkeypatch.setattr(threads, "usable_cores", lambda: 8)
        assert threads.fit_threads() == 2  # never above what torch started with
    finally:
        torch.set_num_threads(started_with)
