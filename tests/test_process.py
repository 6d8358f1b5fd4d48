"""precond_service.client.process: starting, pinning, supervising, stopping real services."""

from __future__ import annotations

import os
import pathlib
import signal
import threading

import pytest

from precond_service.client.process import ServiceChild, local_service, parse_cpus, start_service
from precond_service.client.service_client import wait_for_serving
from precond_service.common.events import Event, EventLog, read_events
from precond_service.status import fetch_status
from tests.conftest import alive, service_children, signal_tree, wait_until

# The lowest CPU this process may use: pinning there differs from no pinning on any
# machine with two or more CPUs.
FIRST_CPU = str(min(os.sched_getaffinity(0)))


def allowed_cpus(pid: int) -> str:
    """The kernel's Cpus_allowed_list of `pid`, e.g. "0" or "0-1"."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for pid {pid}")


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "precond-service-monitor"]


def test_started_service_serves_in_its_own_session_and_stop_leaves_nothing(tmp_path):
    log_path = tmp_path / "service.log"
    service = start_service(["--workers=2"], log_path=log_path)
    try:
        assert service.address.startswith("127.0.0.1:") and service.port > 0
        assert wait_for_serving(service.address, 5)
        workers = list(fetch_status(service.address).worker_pids)
        assert len(workers) == 2
        # Ctrl-C in a terminal goes to the foreground process group of our session only.
        assert os.getsid(service.pid) == os.getpgid(service.pid) == service.pid
        assert os.getsid(service.pid) != os.getsid(0)
        assert allowed_cpus(service.pid) == allowed_cpus(os.getpid())
    finally:
        status = service.stop()
    assert status == 0  # a graceful shutdown on SIGTERM
    assert service.stop() == 0  # idempotent
    assert not alive(service.pid)
    assert wait_until(lambda: not any(alive(pid) for pid in workers), 10), workers
    assert not wait_for_serving(service.address, 0.5)
    assert f"listening on {service.address}" in log_path.read_text()


def test_pinned_service_and_its_workers_run_on_the_given_cpus(tmp_path):
    with start_service(["--workers=2"], cpus=FIRST_CPU, log_path=tmp_path / "log") as service:
        workers = list(fetch_status(service.address).worker_pids)
        assert len(workers) == 2
        # The service is itself, not a launcher: same pid, same command line.
        assert b"precond_service" in pathlib.Path(f"/proc/{service.pid}/cmdline").read_bytes()
        assert [allowed_cpus(pid) for pid in [service.pid, *workers]] == [FIRST_CPU] * 3


def test_killed_child_is_restarted_pinned_on_the_same_port_with_an_event(tmp_path):
    events_path = tmp_path / "events.jsonl"
    with (
        EventLog(events_path) as events,
        ServiceChild(workers=1, restart_delay_s=0.2, cpus=FIRST_CPU, events=events) as child,
    ):
        address, first_pid = child.address, child.pid
        os.kill(first_pid, signal.SIGKILL)
        assert wait_until(lambda: child.restarts == 1, 30)
        assert wait_for_serving(address, 60)
        assert child.address == address and child.pid != first_pid
        assert allowed_cpus(child.pid) == FIRST_CPU
        second_pid = child.pid
        log_text = pathlib.Path(child.log_path).read_text()
    started, restarted = read_events(events_path)
    assert (started["event"], started["pid"], started["address"]) == (
        Event.CHILD_STARTED,
        first_pid,
        address,
    )
    assert restarted["event"] == Event.CHILD_RESTARTED
    assert {k: restarted[k] for k in ("pid", "address", "restarts", "exit_status", "delay_s")} == {
        "pid": second_pid,
        "address": address,
        "restarts": 1,
        "exit_status": -signal.SIGKILL,
        "delay_s": 0.2,
    }
    # Both incarnations wrote to the one log, with a marker between them.
    assert log_text.count("listening on") == 2, log_text
    assert "--- restart 1: previous child exited with status -9 (SIGKILL) ---" in log_text


def test_stopping_the_child_is_not_taken_for_a_crash(tmp_path):
    events_path = tmp_path / "events.jsonl"
    with EventLog(events_path) as events:
        with local_service(workers=1, events=events) as address:
            [pid] = service_children()
            workers = list(fetch_status(address).worker_pids)
    # The monitor has ended, so no restart can come later.
    assert monitor_threads() == []
    assert [e["event"] for e in read_events(events_path)] == [Event.CHILD_STARTED]
    assert not alive(pid) and service_children() == []
    assert wait_until(lambda: not any(alive(w) for w in workers), 10), workers
    assert not wait_for_serving(address, 0.5)


def test_child_crashing_at_start_is_retried_with_growing_delays_then_recovers(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("secret\n")
    events_path = tmp_path / "events.jsonl"
    with (
        EventLog(events_path) as events,
        ServiceChild(
            workers=1,
            extra_args=[f"--token_file={token_file}"],
            restart_delay_s=0.1,
            max_restart_delay_s=0.4,
            events=events,
        ) as child,
    ):
        # Without its token file every restart exits at once ("could not start").
        token_file.unlink()
        os.kill(child.pid, signal.SIGKILL)
        assert wait_until(lambda: child.restarts >= 5, 60)
        token_file.write_text("secret\n")
        # Readable again: the next restart serves on the same port.
        assert wait_for_serving(child.address, 60)
        restarts = child.restarts
    restarted = read_events(events_path, Event.CHILD_RESTARTED)
    assert [e["restarts"] for e in restarted] == list(range(1, restarts + 1))
    # 0.1 s after the kill, then doubling with each exit soon after a start, up to 0.4 s.
    assert [e["delay_s"] for e in restarted[:5]] == [0.1, 0.2, 0.4, 0.4, 0.4], restarted
    assert restarted[0]["exit_status"] == -signal.SIGKILL
    assert all(e["exit_status"] == 1 for e in restarted[1:-1]), restarted


def test_stopped_child_is_continued_and_shuts_down_gracefully():
    child = ServiceChild(workers=1, stop_timeout_s=60)
    child.start()
    signal_tree(child.pid, signal.SIGSTOP)
    pid = child.pid
    # Continued, it handled SIGTERM (status 0), rather than being SIGKILLed later (-9).
    assert child.stop() == 0
    assert not alive(pid)
    assert service_children() == []


def test_service_that_cannot_start_is_reported_with_its_log(tmp_path):
    missing = tmp_path / "no-such-token"
    with pytest.raises(RuntimeError, match=r"exited with status 1 before serving") as raised:
        start_service([f"--token_file={missing}"], log_path=tmp_path / "service.log")
    assert str(missing) in str(raised.value)  # the end of its log says what was wrong
    assert service_children() == []


@pytest.mark.parametrize("cpus", ["x", "1-0", "0,,1", "-1", "0-", "4096"])
def test_bad_cpu_list_is_refused_before_anything_starts(tmp_path, cpus):
    with pytest.raises(ValueError, match=f"cpus={cpus!r}"):
        parse_cpus(cpus)
    with pytest.raises(ValueError, match=f"cpus={cpus!r}"):
        start_service(cpus=cpus, log_path=tmp_path / "service.log")
    with pytest.raises(ValueError, match=f"cpus={cpus!r}"):
        ServiceChild(cpus=cpus)
    assert service_children() == []


def test_cpu_lists_name_the_cpus():
    assert parse_cpus("") == frozenset()
    assert parse_cpus(FIRST_CPU) == {int(FIRST_CPU)}
    allowed = os.sched_getaffinity(0)
    assert parse_cpus(f"{min(allowed)}-{max(allowed)}") >= allowed
    assert parse_cpus(",".join(map(str, sorted(allowed)))) == allowed
