"""A real Dask cluster for the tests: `LocalCluster(processes=True)` with single-threaded worker
processes (2 by default), run in a child process of its own (its nannies would otherwise be children of the test
process). Prints the scheduler's address, then runs until its stdin closes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil


def main(workers: int) -> None:
    from distributed import LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        print(cluster.scheduler_address, flush=True)
        sys.stdin.read()


class DaskCluster:
    def __init__(self, workers: int = 2) -> None:
        # As a module from the repository's root: run as a script, its folder (tests/) would come first
        # on sys.path, and tests/cachegen would shadow the cachegen package in the workers.
        self._process = subprocess.Popen([sys.executable, "-m", "tests.daskcluster", str(workers)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
        self.address = self._process.stdout.readline().strip()
        if not self.address.startswith("tcp://"):
            self.stop()
            raise RuntimeError("the Dask cluster did not start")

    def worker_pids(self) -> list[int]:
        """The worker processes (the nannies, in the cluster's process, start them as its children)."""
        children = psutil.Process(self._process.pid).children()
        return [c.pid for c in children if "spawn_main" in " ".join(c.cmdline())]

    def stop(self) -> None:
        self._process.stdin.close()
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


if __name__ == "__main__":
    main(int(sys.argv[1]))
