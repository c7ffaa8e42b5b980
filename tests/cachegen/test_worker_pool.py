"""cachegen.pool.WorkerPool with real worker processes: results, exceptions, a worker that dies,
shutdown and stop, both start methods."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import BrokenExecutor, CancelledError, as_completed, wait

import pytest

from cachegen.errors import CachegenError
from cachegen.pool import RemoteTraceback, WorkerDied, WorkerError, WorkerPool

METHODS = [m for m in ("fork", "spawn") if m in mp.get_all_start_methods()]


def square(x: int) -> int:
    return x * x


def nap(seconds: float, value=None):
    time.sleep(seconds)
    return value


def fail(message: str):
    raise CachegenError(message)


class ShardError(Exception):
    """An exception that pickles but does not unpickle: its __init__ takes other arguments than its args."""

    def __init__(self, shard: str, reason: str):
        super().__init__(f"{shard}: {reason}")


def fail_oddly(shard: str):
    raise ShardError(shard, "cannot be written")


def exit_with(code: int):
    os._exit(code)


def pid() -> int:
    return os.getpid()


def record_start(folder: str) -> None:
    with open(os.path.join(folder, str(os.getpid())), "a") as f:
        f.write("started\n")


def broken_initializer() -> None:
    raise CachegenError("the worker cannot start: no such transform")


def wait_for_file(path: str) -> str:
    while not os.path.exists(path):
        time.sleep(0.01)
    return path


def handed_out(futures) -> None:
    """Wait until the pool has given each of `futures` to a worker (it runs there, or will first)."""
    deadline = time.monotonic() + 30
    while not all(f.running() for f in futures):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(params=METHODS)
def context(request):
    return mp.get_context(request.param)


def test_results_arrive_as_tasks_finish_and_exceptions_as_themselves(context):
    with WorkerPool(2, mp_context=context) as pool:
        slow, fast = pool.submit(nap, 1.0, "slow"), pool.submit(nap, 0.0, "fast")
        assert [f.result() for f in as_completed([slow, fast])] == ["fast", "slow"]
        assert [f.result() for f in [pool.submit(square, x) for x in range(20)]] == [x * x for x in range(20)]
        failed = pool.submit(fail, "--out is a file: pass a folder")
        with pytest.raises(CachegenError) as raised:
            failed.result()
        assert type(raised.value) is CachegenError and str(raised.value) == "--out is a file: pass a folder"
        # where it was raised in the worker, for an unexpected error's traceback
        assert isinstance(raised.value.__cause__, RemoteTraceback) and "in fail" in str(raised.value.__cause__)
        assert pool.submit(square, 3).result() == 9  # a task's exception leaves the pool working


def test_an_exception_that_does_not_unpickle_arrives_with_its_message_and_traceback(context):
    with WorkerPool(1, mp_context=context) as pool:
        # A WorkerError naming it; or the ShardError itself where a library in this process (tblib, which
        # dask's distributed installs) taught pickle to rebuild exceptions without their __init__.
        with pytest.raises((WorkerError, ShardError)) as raised:
            pool.submit(fail_oddly, "epoch-0000/shard-000003.tar").result(timeout=60)
        assert str(raised.value).endswith("epoch-0000/shard-000003.tar: cannot be written")
        if isinstance(raised.value, WorkerError):
            assert str(raised.value).startswith("test_worker_pool.ShardError: ")
        assert isinstance(raised.value.__cause__, RemoteTraceback) and "in fail_oddly" in str(raised.value.__cause__)
        assert pool.submit(square, 3).result(timeout=60) == 9


def test_a_worker_killed_by_sigkill_fails_the_unfinished_tasks_with_its_pid_and_signal(context):
    pool = WorkerPool(2, mp_context=context)
    try:
        running = [pool.submit(nap, 60) for _ in range(2)]
        queued = [pool.submit(square, x) for x in range(4)]
        handed_out(running)
        victim = pool.pids[0]
        os.kill(victim, signal.SIGKILL)
        done, not_done = wait(running + queued, timeout=30)
        assert not not_done  # never a hang
        for future in running + queued:
            error = future.exception()
            assert isinstance(error, WorkerDied) and isinstance(error, BrokenExecutor)
            assert (error.pid, error.exitcode) == (victim, -signal.SIGKILL)
        assert error.describe() == (f"worker process {victim} was killed by SIGKILL (the out-of-memory killer "
                                    "sends it: see `dmesg`)")
        with pytest.raises(WorkerDied):
            pool.submit(square, 1)
    finally:
        pool.stop()
    assert not any(alive(p) for p in pool.pids)


def test_a_worker_that_exits_is_named_with_its_status(context):
    with WorkerPool(2, mp_context=context) as pool:
        exits = pool.submit(exit_with, 3)
        with pytest.raises(WorkerDied) as raised:
            exits.result(timeout=30)
    assert raised.value.pid in pool.pids and raised.value.exitcode == 3
    assert raised.value.describe() == f"worker process {raised.value.pid} exited with status 3"
    assert str(raised.value) == raised.value.describe()


def test_shutdown_waits_for_every_task_and_ends_every_worker(context):
    pool = WorkerPool(2, mp_context=context)
    futures = [pool.submit(nap, 0.05, x) for x in range(8)]
    pool.shutdown(wait=True)
    assert [f.result(timeout=0) for f in futures] == list(range(8))
    assert not any(alive(p) for p in pool.pids) and not mp.active_children()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(square, 1)


def test_shutdown_with_cancel_futures_cancels_queued_tasks_and_leaves_no_process(context, tmp_path):
    pool = WorkerPool(2, mp_context=context)
    gate = str(tmp_path / "gate")
    running = [pool.submit(wait_for_file, gate) for _ in range(2)]
    queued = [pool.submit(square, x) for x in range(6)]
    handed_out(running)
    pool.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    open(gate, "w").close()  # the running tasks finish: shutdown waits for them, it does not stop them
    pool.shutdown(wait=True)
    assert [f.result(timeout=0) for f in running] == [gate, gate]
    assert not any(alive(p) for p in pool.pids) and not mp.active_children()


def test_stop_terminates_running_tasks_and_cancels_queued_ones_at_once(context):
    pool = WorkerPool(2, mp_context=context)
    running = [pool.submit(nap, 60) for _ in range(2)]
    queued = [pool.submit(square, x) for x in range(4)]
    handed_out(running)
    start = time.monotonic()
    pool.stop()
    assert time.monotonic() - start < 10  # not the tasks' 60 s
    assert all(f.cancelled() for f in queued)
    for future in running:
        with pytest.raises(BrokenExecutor):
            future.result(timeout=0)
    assert not any(alive(p) for p in pool.pids) and not mp.active_children()
    pool.stop()  # a second stop (an error path, then finally) is harmless
    with pytest.raises(CancelledError):
        queued[0].result()


def test_the_initializer_runs_once_in_each_worker(context, tmp_path):
    with WorkerPool(3, mp_context=context, initializer=record_start, initargs=(str(tmp_path),)) as pool:
        served = {f.result() for f in [pool.submit(pid) for _ in range(30)]}
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == sorted(pool.pids)
    assert all(p.read_text() == "started\n" for p in tmp_path.iterdir())
    assert served <= set(pool.pids)


def test_an_initializer_error_fails_the_tasks_with_that_error(context):
    pool = WorkerPool(2, mp_context=context, initializer=broken_initializer)
    try:
        with pytest.raises(CachegenError, match="^the worker cannot start: no such transform$"):
            pool.submit(square, 2).result(timeout=60)  # submit raises it once the pool knows
    finally:
        pool.stop()
    assert not any(alive(p) for p in pool.pids)


def test_a_task_that_does_not_pickle_fails_alone(context):
    with WorkerPool(1, mp_context=context) as pool:
        unpicklable = pool.submit(square, lambda: 1)
        with pytest.raises(Exception, match="pickle"):
            unpicklable.result(timeout=30)
        assert pool.submit(square, 4).result(timeout=30) == 16


def test_workers_end_with_the_pool_process_however_it_ends(context):
    """The pool's process killed alone (the OOM killer's SIGKILL), one worker busy, one idle: neither
    outlives it."""
    script = ("import multiprocessing as mp, sys, time\nfrom cachegen.pool import WorkerPool\n"
              "from tests.cachegen.test_worker_pool import nap\n"
              f"pool = WorkerPool(2, mp_context=mp.get_context({context.get_start_method()!r}))\n"
              "pool.submit(nap, 600)\nprint(*pool.pids, flush=True)\ntime.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
    finally:
        parent.kill()
        parent.communicate(timeout=60)
    assert len(workers) == 2
    deadline = time.monotonic() + 60
    while any(running(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.01)
    left = [p for p in workers if running(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"workers {left} outlived the pool's process"


def running(pid: int) -> bool:
    """Whether process `pid` exists and has not ended (a zombie, not yet reaped by init, has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def touch_later(path: str) -> None:
    time.sleep(0.2)
    open(path, "w").close()


def test_a_program_that_never_shuts_its_pool_down_finishes_its_tasks_and_exits(tmp_path):
    """As with concurrent.futures' pools: at exit the queued tasks run, then the workers end (no hang
    in multiprocessing's own exit, which joins them)."""
    script = ("import sys\nfrom cachegen.pool import WorkerPool\nfrom tests.cachegen.test_worker_pool import touch_later\n"
              "pool = WorkerPool(2)\nfor i in range(4):\n    pool.submit(touch_later, f'{sys.argv[1]}/{i}')\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1", "2", "3"]
