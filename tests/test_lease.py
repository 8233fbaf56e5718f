"""The workdir lease: one run at a time, expired or orphaned leases taken over, waiting on request."""

import json
import subprocess
import sys
import threading
import time

import pytest

from tests.run_helpers import invoke, run_args, summaries
from xmodal_index.jobs.run_job import EXIT_LEASE_HELD
from xmodal_index.sinks import storage
from xmodal_index.sinks.index.manifest import list_versions, read_latest
from xmodal_index.sinks.storage.lease import (
    Lease,
    LeaseConfig,
    LeaseHeldError,
    LeaseLostError,
    lease_uri,
    read_lease,
)


@pytest.fixture(params=["local", "s3"])
def workdir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "work")
    return request.getfixturevalue("s3_bucket") + "/work"


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_acquire_writes_who_holds_it_and_release_removes_it(workdir):
    lease = Lease(lease_uri(workdir), "run-a", holder="nightly")
    lease.acquire()
    info = read_lease(workdir)
    assert (info.run_id, info.holder) == ("run-a", "nightly")
    raw = json.loads(storage.read_bytes(lease_uri(workdir)))
    for key in ("holder", "run_id", "host", "pid", "acquired_at", "expires_at"):
        assert key in raw
    assert info.expires_at - info.acquired_at == pytest.approx(LeaseConfig().ttl_s, abs=1)
    lease.release()
    assert read_lease(workdir) is None


def test_a_second_run_is_refused_with_the_holder_named(workdir):
    with Lease(lease_uri(workdir), "run-a"):
        with pytest.raises(LeaseHeldError, match="run-a"):
            Lease(lease_uri(workdir), "run-b").acquire()
    with Lease(lease_uri(workdir), "run-b"):  # free again once released
        assert read_lease(workdir).run_id == "run-b"


def test_an_expired_lease_is_taken_over_and_its_holder_learns_it_lost(workdir):
    clock = Clock()
    first = Lease(lease_uri(workdir), "run-a", LeaseConfig(ttl_s=60), clock=clock)
    first.acquire()
    clock.t += 61
    second = Lease(lease_uri(workdir), "run-b", LeaseConfig(ttl_s=60), clock=clock)
    second.acquire()
    assert read_lease(workdir).run_id == "run-b"
    with pytest.raises(LeaseLostError, match="run-b"):
        first.confirm()
    first.release()  # does not remove the new holder's lease
    assert read_lease(workdir).run_id == "run-b"
    second.release()


def test_a_lease_left_by_a_killed_process_on_this_host_is_taken_over(workdir):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    orphan = Lease(lease_uri(workdir), "killed-run")
    orphan.acquire()
    orphan._stop.set()  # simulate the kill: the heartbeat stops and nothing is released
    info = read_lease(workdir)
    doctored = json.loads(info.to_json())
    doctored["pid"] = proc.pid  # a process that no longer exists
    storage.write_bytes(lease_uri(workdir), json.dumps(doctored).encode())
    with Lease(lease_uri(workdir), "rerun") as rerun:
        assert rerun.held and read_lease(workdir).run_id == "rerun"


def test_a_waiting_run_gets_the_lease_once_it_is_released(workdir):
    holder = Lease(lease_uri(workdir), "run-a")
    holder.acquire()
    waits = []
    threading.Timer(0.5, holder.release).start()
    waiter = Lease(lease_uri(workdir), "run-b", LeaseConfig(wait_s=20, poll_s=0.1))
    waiter.acquire(on_wait=waits.append)
    assert [w.run_id for w in waits] == ["run-a"]
    assert read_lease(workdir).run_id == "run-b"
    waiter.release()


def test_waiting_gives_up_after_the_wait(workdir):
    with Lease(lease_uri(workdir), "run-a"):
        started = time.monotonic()
        with pytest.raises(LeaseHeldError, match="after waiting"):
            Lease(lease_uri(workdir), "run-b", LeaseConfig(wait_s=0.3, poll_s=0.1)).acquire()
        assert time.monotonic() - started >= 0.3


def test_the_heartbeat_keeps_a_long_run_s_lease_alive(workdir):
    with Lease(lease_uri(workdir), "run-a", LeaseConfig(ttl_s=1.0, renew_every_s=0.1)) as lease:
        time.sleep(1.5)  # longer than the ttl: only renewals keep it
        assert read_lease(workdir).expires_at > time.time()
        with pytest.raises(LeaseHeldError):
            Lease(lease_uri(workdir), "run-b", LeaseConfig(ttl_s=1.0)).acquire()
        lease.confirm()


def test_of_racing_runs_exactly_one_gets_the_lease(workdir):
    barrier = threading.Barrier(6)
    won, refused = [], []

    def attempt(i):
        lease = Lease(lease_uri(workdir), f"run-{i}")
        barrier.wait()
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeldError:
            refused.append(i)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
    assert read_lease(workdir).run_id == won[0].run_id
    won[0].release()


def test_every_acquisition_gets_a_larger_generation(workdir):
    generations = []
    for run in ("run-a", "run-b", "run-c"):
        with Lease(lease_uri(workdir), run) as lease:
            generations.append(lease.generation)
    assert generations == [1, 2, 3]
    clock = Clock()
    stale = Lease(lease_uri(workdir), "run-d", LeaseConfig(ttl_s=60), clock=clock)
    stale.acquire()
    clock.t += 61
    with Lease(lease_uri(workdir), "run-e", LeaseConfig(ttl_s=60), clock=clock) as taker:
        assert (stale.generation, taker.generation) == (4, 5)
    stale.release()


def test_check_tells_a_holder_whose_lease_was_taken_over(workdir):
    clock = Clock()
    first = Lease(lease_uri(workdir), "run-a", LeaseConfig(ttl_s=60), clock=clock)
    first.acquire()
    first.check()  # still ours
    clock.t += 61
    with Lease(lease_uri(workdir), "run-b", LeaseConfig(ttl_s=60), clock=clock) as second:
        second.check()
        with pytest.raises(LeaseLostError, match="run-b"):
            first.check()
    first.release()


def test_a_lease_written_before_generations_existed_is_still_read(workdir):
    old = {"holder": "xmodal-index run", "run_id": "old-run", "host": "elsewhere", "pid": 1, "token": "t",
           "acquired_at": 0.0, "renewed_at": 0.0, "expires_at": 1.0}
    storage.write_bytes(lease_uri(workdir), json.dumps(old).encode())
    assert read_lease(workdir).run_id == "old-run"
    with Lease(lease_uri(workdir), "new-run") as lease:  # expired long ago: taken over
        assert lease.generation == 1


# ---------------------------------------------------------------- through the CLI


def test_run_exits_4_while_another_run_holds_the_workdir(archive, config, tmp_path):
    work = tmp_path / "work"
    out = tmp_path / "last-summary.json"
    with Lease(lease_uri(str(work)), "the-other-run"):
        result = invoke(*run_args(archive, work, config, "--summary-out", out))
    assert result.exit_code == EXIT_LEASE_HELD
    assert "the-other-run" in result.output and "--wait-for-lease" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (work / "runs").exists() and not (work / "ledger").exists()
    assert json.loads(out.read_text())["exit_code"] == EXIT_LEASE_HELD  # what a monitoring script reads


def test_run_with_wait_for_lease_runs_once_the_holder_is_done(archive, config, tmp_path):
    work = tmp_path / "work"
    holder = Lease(lease_uri(str(work)), "the-other-run")
    holder.acquire()
    threading.Timer(1.0, holder.release).start()
    result = invoke(*run_args(archive, work, config, "--wait-for-lease", "60"))
    assert result.exit_code == 0, result.output
    assert "waiting up to 60 s" in result.output
    assert read_lease(str(work)) is None  # released at the end


def test_two_concurrent_runs_never_publish_over_each_other(archive, config, tmp_path):
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "xmodal_index", *map(str, run_args(archive, work, config, "--wait-for-lease", "120"))]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    runs = summaries(str(work))
    # one run indexed the archive and published; the other came after it and found nothing to do
    # (either process may win the lease: run ids are taken before it)
    outcomes = sorted(((s["indexed"], s["unchanged"], s["index_published"]) for s in runs), reverse=True)
    assert outcomes == [(8, 0, True), (0, 8, False)]
    assert list_versions(str(work / "indexes" / "main")) == ["v000001"] == [read_latest(str(work / "indexes" / "main"))]
