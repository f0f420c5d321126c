"""Executors run a phase's independent tasks: in this process, or on a Ray cluster.

``map(function, argument_tuples)`` returns the results in order. Both executors run the
same module-level stage functions against the same on-disk cache and SQLite store, so a
run can be started with one and resumed with the other.
"""

from __future__ import annotations

from typing import Callable

from peftshield.errors import ConfigError
from peftshield.registry import Registry

EXECUTORS: Registry = Registry("executor")


@EXECUTORS.register
class LocalExecutor:
    """Runs every task in this process, one after another."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers

    def map(self, function: Callable, arguments: list[tuple]) -> list:
        return [function(*args) for args in arguments]


@EXECUTORS.register
class RayExecutor:
    """One Ray task per stage, on a local Ray or a cluster (--ray-address).

    ``address`` None starts a local Ray with ``workers`` CPUs; ``'auto'`` or
    ``ray://host:port`` joins a running cluster."""

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None, cpus_per_task: float = 1.0) -> None:
        self.workers = workers
        self.address = address
        self.cpus_per_task = cpus_per_task

    def connect(self):
        """The ``ray`` module, initialised: a local Ray with ``workers`` CPUs, or the cluster at ``address``."""
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs the 'ray' package: pip install 'peftshield[ray]'") from None
        if not ray.is_initialized():
            # Without --ray-address, a Ray of its own ("local"): never a cluster that happens to run on this machine.
            try:
                ray.init(address=self.address or "local", num_cpus=None if self.address else self.workers, include_dashboard=False,
                         log_to_driver=True, configure_logging=False)
            except Exception as exc:  # ConnectionError, an authentication error, a version mismatch, ...
                where = f"--ray-address {self.address}: cannot join" if self.address else "a local Ray: cannot start"
                raise ConfigError(f"{where} ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
        return ray

    def map(self, function: Callable, arguments: list[tuple]) -> list:
        if not arguments:
            return []
        ray = self.connect()
        remote = ray.remote(num_cpus=self.cpus_per_task)(function)
        return ray.get([remote.remote(*args) for args in arguments])
