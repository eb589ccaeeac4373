"""Where a sweep runs: a Dask client given by the caller, a scheduler's address, or a local cluster started here.

The local cluster has worker processes of one thread each (``LocalCluster(processes=True, threads_per_worker=1)``),
its dashboard on a free port (so that several sweeps or tests never compete for 8787), and Dask's logs below ERROR
silenced.
An address is checked first with one connection and Dask's handshake, bounded by a timeout: an unreachable
scheduler, or a port where something else answers, is one ConnectionError within ``timeout`` seconds, not a hang.
Before any point runs, every worker must report the same gatelens and torch versions as this process: another
version could give other numbers for the same point.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from gatelens.sweep.table import versions
from gatelens.sweep.task import worker_versions


def check_options(client: Any, scheduler: Any, workers: Any, timeout: Any) -> None:
    """The connection options, checked before anything else happens (and that Dask is installed)."""
    try:
        import distributed  # noqa: F401
    except ModuleNotFoundError:
        raise ModuleNotFoundError("gatelens sweep runs on Dask: pip install 'gatelens[sweep]'") from None
    if client is not None:
        from distributed import Client

        if not isinstance(client, Client):
            raise TypeError(f"client must be a dask.distributed.Client, got {type(client).__name__}")
        if scheduler is not None or workers is not None:
            raise ValueError("give a client, or a scheduler address, or a number of local workers: not several")
    if scheduler is not None:
        if not isinstance(scheduler, str) or not scheduler.strip():
            raise TypeError(f"scheduler must be an address such as 'tcp://host:8786', got {scheduler!r}")
        if workers is not None:
            raise ValueError("--workers sets the size of the local cluster; a scheduler's workers are the ones started "
                             "with `dask worker` on its machines")  # fmt: skip
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be an int ≥ 1 (local worker processes), got {workers!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"the connection timeout must be a number of seconds > 0, got {timeout!r}")


@contextlib.contextmanager
def connect(client: Any, scheduler: str | None, workers: int | None, timeout: float, points: int) -> Iterator[Any]:
    """A connected ``distributed.Client``: ``client`` itself (left open), one connected to ``scheduler``, or one on
    a local cluster of ``workers`` processes (default: as many as there are CPUs, at most ``points``); what is
    started here is closed on the way out."""
    if client is not None:
        check_workers(client)
        yield client
        return
    from distributed import Client, LocalCluster

    if scheduler is not None:
        address = scheduler.strip()
        probe(address, timeout)
        with Client(address, timeout=timeout, set_as_default=False) as remote:
            check_workers(remote)
            yield remote
        return
    count = workers or max(1, min(os.cpu_count() or 1, points))
    with LocalCluster(
        n_workers=count,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",  # a free port: None still binds 8787, which another sweep or program may hold
        silence_logs=logging.ERROR,
    ) as cluster, Client(cluster, set_as_default=False) as local:  # fmt: skip
        yield local


def probe(address: str, timeout: float) -> None:
    """Connect to ``address`` once, with Dask's handshake, within ``timeout`` seconds; a ConnectionError if that
    fails. Runs in a thread of its own, so that it works where an event loop is already running (Jupyter)."""
    from distributed.comm import connect as open_comm

    async def handshake() -> None:
        comm = await open_comm(address, timeout=timeout)
        await comm.close()

    outcome: list[BaseException] = []

    def attempt() -> None:
        try:
            asyncio.run(asyncio.wait_for(handshake(), timeout + 1.0))
        except BaseException as error:  # noqa: BLE001 - every failure to connect becomes one message below
            outcome.append(error)

    thread = threading.Thread(target=attempt, name="gatelens-sweep-probe", daemon=True)
    thread.start()
    thread.join(timeout + 2.0)
    if thread.is_alive() or outcome:
        reason = "no answer" if not outcome else " ".join(str(outcome[0]).split()) or type(outcome[0]).__name__
        if outcome and isinstance(outcome[0], (ValueError, TypeError)) and "://" not in address:
            reason += "; expected an address such as tcp://host:8786"
        elif outcome and isinstance(outcome[0], MemoryError):
            reason = "something answered, but not a Dask scheduler (the dashboard's port, 8787, instead of 8786?)"
        raise ConnectionError(f"cannot reach a Dask scheduler at {address} within {timeout:g} s: {reason}")


def check_workers(client: Any) -> None:
    """Refuse workers that cannot import gatelens, or that run another version of gatelens or torch."""
    try:
        found = client.run(worker_versions, on_error="return")
    except Exception as error:  # the function could not even be sent
        raise ValueError(f"cannot run gatelens on the Dask workers: {' '.join(str(error).split())}") from None
    here = versions()
    for worker, theirs in sorted(found.items()):
        if isinstance(theirs, BaseException):
            raise ValueError(f"worker {worker} cannot run gatelens ({type(theirs).__name__}: {theirs}); install "
                             "gatelens with its sweep extra on every machine of the cluster")  # fmt: skip
        different = [name for name in ("gatelens", "torch") if theirs.get(name) != here[name]]
        if different:
            raise ValueError(
                f"worker {worker} has {', '.join(f'{name} {theirs.get(name)}' for name in different)}, this machine "
                f"{', '.join(f'{name} {here[name]}' for name in different)}: the same point could give other numbers; "
                "install the same versions on every machine"
            )
