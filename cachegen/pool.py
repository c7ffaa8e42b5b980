"""A process pool behind the concurrent.futures.Executor interface whose worker processes are our
own multiprocessing.Process objects: which worker died, and how, comes from them, not from
ProcessPoolExecutor's private attributes (which change between Python releases without notice).

Each worker has a pipe of its own (no queue shared by all, whose lock a killed worker could hold).
One dispatcher thread in the parent hands queued tasks to idle workers, one at a time, and waits
on every worker's pipe and process sentinel and on a wake-up pipe for submit() and shutdown().
A worker that ends while the pool needs it breaks the pool: every unfinished task fails with
WorkerDied, which says which process ended and how.

A worker never outlives the pool's process, however that process ends (kill -9, the OOM killer):
a thread in each worker waits on multiprocessing.parent_process().sentinel, which becomes readable
the moment the parent ends, and exits the worker then, busy or idle. Chosen by killing (SIGKILL) a
parent of one busy and one idle worker under fork, spawn and forkserver: the sentinel ended both
under all three; prctl(PR_SET_PDEATHSIG) under fork and spawn only (under forkserver, Python 3.14's
default on Linux, it watches the fork server, not the pool's process; it is also Linux-only and
fires when the forking *thread* ends). Closing the parent's pipe ends in a forked child would free
an idle worker only: a busy one would write its shard to the end first. (Under fork, a worker's
sentinel is also held by its younger siblings: they end first, on theirs, and then it does.) loky
(not a dependency) would replace this whole pool, and its worker-by-worker account of deaths, to
gain what these few lines do.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import pickle
import signal
import threading
import traceback
import weakref
from collections import deque
from concurrent.futures import BrokenExecutor, Executor, Future
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import connection


class WorkerDied(BrokenProcessPool):
    """A worker process ended while the pool needed it: its pid and exit code (as
    multiprocessing.Process.exitcode: minus the signal's number for one killed by a signal)."""

    def __init__(self, pid: int, exitcode: int):
        super().__init__(pid, exitcode)
        self.pid, self.exitcode = pid, exitcode

    def __str__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        """Which worker ended and how, in words."""
        if self.exitcode < 0:
            try:
                name = signal.Signals(-self.exitcode).name
            except ValueError:  # a real-time signal has no name
                name = f"signal {-self.exitcode}"
            oom = " (the out-of-memory killer sends it: see `dmesg`)" if self.exitcode == -signal.SIGKILL else ""
            return f"worker process {self.pid} was killed by {name}{oom}"
        return f"worker process {self.pid} exited with status {self.exitcode}"


class RemoteTraceback(Exception):
    """The traceback, in the worker, of an exception a task raised there: that exception's __cause__."""

    def __str__(self) -> str:
        return self.args[0]


class WorkerError(Exception):
    """An exception a task raised in a worker that cannot be sent or rebuilt here (one whose __init__
    takes other arguments than its args, e.g. `ShardError(shard, reason)`, one holding something that
    does not pickle, or whose class is not importable here): its type and message; its traceback in
    the worker is its __cause__."""


def _with_traceback(pickled: bytes, summary: str, text: str) -> BaseException:
    try:
        exc = pickle.loads(pickled)
    except Exception:  # noqa: BLE001 - whatever rebuilding it raises, the worker's own error is the one to report
        exc = WorkerError(summary)
    exc.__cause__ = RemoteTraceback(text)
    return exc


class _Raised:
    """An exception on its way from a worker: it arrives as itself (pickled, rebuilt here), its
    traceback as text; one that pickles but cannot be rebuilt arrives as a WorkerError that says
    what it was, not as the TypeError its rebuilding raises."""

    def __init__(self, exc: BaseException):
        self.exc = exc
        self.text = '\n"""\n' + "".join(traceback.format_exception(exc)) + '"""'

    def __reduce__(self):
        exc = self.exc
        summary = f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
        try:
            pickled = pickle.dumps(exc)
        except Exception:  # noqa: BLE001 - it does not pickle (an attribute that cannot): its summary arrives
            pickled = b""
        return _with_traceback, (pickled, summary, self.text)


def _reply(conn, reply: tuple) -> bool:
    """Send a task's outcome; False when the pool's end is closed (the pool stopped)."""
    try:
        conn.send(reply)  # pickled whole before any byte is written: a failure leaves the pipe clean
        return True
    except (OSError, EOFError):
        return False
    except Exception as e:  # the result or the exception does not pickle: say that instead
        unsent = e
    try:
        conn.send(("init" if reply[0] == "init" else "error", _Raised(unsent)))
        return True
    except (OSError, EOFError):
        return False


def _end_with_parent() -> None:
    """Exit this worker the moment the process that started it ends (see the module's docstring)."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # waits on its sentinel
        os._exit(1)

    threading.Thread(target=watch, name="WorkerPool-parent-watch", daemon=True).start()


def _serve(conn, initializer, initargs) -> None:
    """A worker's life: initializer(*initargs), then (fn, args, kwargs) from `conn`, each answered
    with ("ok", result) or ("error", exception), until None or the pool's end closes."""
    _end_with_parent()
    # terminate() must end a worker, whatever SIGTERM handler a forked one inherited from its parent.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException as e:
            _reply(conn, ("init", _Raised(e)))
            return
    while True:
        try:
            task = conn.recv()
        except (OSError, EOFError):
            return
        except Exception as e:  # a task that does not unpickle here (its function not importable under spawn)
            if not _reply(conn, ("error", _Raised(e))):
                return
            continue
        if task is None:
            return
        fn, args, kwargs = task
        del task
        try:
            reply = ("ok", fn(*args, **kwargs))
        except BaseException as e:
            reply = ("error", _Raised(e))
        del fn, args, kwargs  # a task's arrays freed before waiting for the next
        if not _reply(conn, reply):
            return
        del reply


class _Worker:
    """One worker process, the parent's end of its pipe, and the future of the task it runs."""

    def __init__(self, ctx, initializer, initargs):
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_serve, args=(child, initializer, initargs))
        try:
            self.process.start()
        except BaseException:
            self.conn.close()
            raise
        finally:
            # Closed before the next worker forks, so that only this worker holds its end: the
            # parent's reads see end-of-file the moment it dies.
            child.close()
        self.future: Future | None = None
        self.lost = False  # its pipe said end-of-file: it is exiting, its sentinel says how

    def end(self, clean: bool) -> None:
        """Ask an idle worker to exit (clean), else terminate it; then join it."""
        if self.process.exitcode is None:
            try:
                if clean:
                    self.conn.send(None)
                else:
                    self.process.terminate()
            except (OSError, EOFError):
                pass
        self.process.join()
        self.conn.close()


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register  # registered after multiprocessing's own exit hook, so run before it joins the workers
def _shut_down_all() -> None:
    """At exit, as the Executor contract says: every pool's pending tasks finished, then its workers ended."""
    for pool in list(_LIVE):
        pool.shutdown(wait=True)


class WorkerPool(Executor):
    """`max_workers` processes started now from `mp_context` (multiprocessing's default without
    one), each running initializer(*initargs) once, then the tasks submit() gives it.

    A worker that ends while the pool needs it (killed, os._exit) fails every unfinished task with
    WorkerDied; an initializer that raises fails them with its exception. shutdown() follows the
    Executor contract; stop() ends the pool now.
    """

    def __init__(self, max_workers: int, mp_context=None, initializer=None, initargs: tuple = ()):
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        ctx = mp_context or mp.get_context()
        self._lock = threading.Lock()
        self._pending: deque = deque()  # (future, fn, args, kwargs) not yet handed to a worker
        self._closed = False  # shutdown() or stop(): no new tasks
        self._stopping = False  # stop(): end now
        self._broken: BaseException | None = None  # what every unfinished task fails with
        self._finished = False  # the dispatcher has ended and closed the wake-up pipe
        self._workers: list[_Worker] = []
        try:
            for _ in range(max_workers):
                self._workers.append(_Worker(ctx, initializer, initargs))
        except BaseException:
            for worker in self._workers:
                worker.end(clean=False)
            raise
        # Made after the workers start, so that forked ones do not hold it.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._dispatch, name="WorkerPool-dispatcher", daemon=True)
        _LIVE.add(self)
        self._thread.start()

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids."""
        return [w.process.pid for w in self._workers]

    def submit(self, fn, /, *args, **kwargs) -> Future:
        with self._lock:
            if self._broken is not None:
                raise self._broken
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future = Future()
            self._pending.append((future, fn, args, kwargs))
        self._wake()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._close(stop=False, cancel=cancel_futures)
        if wait:
            self._join()

    def stop(self) -> None:
        """End the pool now: queued tasks cancelled, workers still running one terminated (those
        tasks fail with BrokenExecutor), every worker joined. For errors and Ctrl-C."""
        self._close(stop=True, cancel=True)
        self._join()

    def _close(self, stop: bool, cancel: bool) -> None:
        with self._lock:
            self._closed = True
            self._stopping |= stop
            queued = self._pending if cancel else ()
            if cancel:
                self._pending = deque()
        for future, *_ in queued:
            future.cancel()
        self._wake()

    def _join(self) -> None:
        if threading.current_thread() is not self._thread:  # a future's callback may shut the pool down
            self._thread.join()

    def _wake(self) -> None:
        with self._lock:
            if not self._finished:
                try:
                    os.write(self._wake_w, b"\0")
                except BlockingIOError:  # full: a wake-up is waiting already
                    pass

    def _dispatch(self) -> None:
        try:
            while self._hand_out():
                self._wait()
        except BaseException as e:  # a bug here must not leave the callers waiting forever
            self._break(e)
            raise
        finally:
            self._end()

    def _hand_out(self) -> bool:
        """Give queued tasks to idle workers; False when the pool is to end."""
        idle = [w for w in self._workers if w.future is None]
        while True:
            with self._lock:
                if self._stopping or self._broken is not None:
                    return False
                if not self._pending:
                    return not self._closed or len(idle) < len(self._workers)
                if not idle:
                    return True
                future, fn, args, kwargs = self._pending.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            worker = idle.pop()
            worker.future = future
            try:
                worker.conn.send((fn, args, kwargs))
            except (OSError, EOFError):  # it died: its sentinel says how
                pass
            except Exception as e:  # the task does not pickle
                worker.future = None
                idle.append(worker)
                future.set_exception(e)

    def _wait(self) -> None:
        """Wait for a reply, a worker's end or a wake-up, and act on it."""
        pipes = {w.conn: w for w in self._workers if not w.lost}
        sentinels = {w.process.sentinel: w for w in self._workers}
        ready = connection.wait([self._wake_r, *pipes, *sentinels])
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        for worker in [pipes[r] for r in ready if r in pipes]:  # replies first: sent before any death
            self._receive(worker)
        for worker in [sentinels[r] for r in ready if r in sentinels]:
            worker.process.join()
            self._break(WorkerDied(worker.process.pid, worker.process.exitcode))

    def _receive(self, worker: _Worker) -> None:
        try:
            kind, value = worker.conn.recv()
        except (OSError, EOFError):
            worker.lost = True
            return
        except Exception as e:  # an exception from the worker that does not unpickle here
            kind, value = "error", e
        if kind == "init":
            self._break(value)
            return
        future, worker.future = worker.future, None
        if future is None:  # its task failed already: the pool broke in this same wait
            return
        if kind == "ok":
            future.set_result(value)
        else:
            future.set_exception(value)

    def _break(self, error: BaseException) -> None:
        """Fail every unfinished task with `error`, the first reason the pool broke."""
        with self._lock:
            if self._broken is None:
                self._broken = error
            error = self._broken
            queued, self._pending = self._pending, deque()
        for future, *_ in queued:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        for worker in self._workers:
            if worker.future is not None:
                worker.future, future = None, worker.future
                if not future.done():
                    future.set_exception(error)

    def _end(self) -> None:
        """Every worker ended and joined (asked to exit when the pool ends cleanly, else
        terminated), tasks they were running failed, the wake-up pipe closed."""
        with self._lock:
            clean = not self._stopping and self._broken is None
        for worker in self._workers:
            worker.end(clean)
        stopped = BrokenExecutor("the pool was stopped before this task finished")
        for worker in self._workers:
            if worker.future is not None and not worker.future.done():
                worker.future.set_exception(stopped)
        with self._lock:
            self._finished = True
            os.close(self._wake_r)
            os.close(self._wake_w)
        _LIVE.discard(self)
