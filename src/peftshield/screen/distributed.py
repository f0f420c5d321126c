"""Stage 1 on Ray, for fleets that outgrow one machine: Ray Data over the fleet's targets, the
features computed by a pool of actors (``map_batches`` with a callable class), the results
streamed back to the driver, which scores the fleet as :func:`peftshield.screen.run.stage1` does.

``--executor ray`` starts a local Ray with ``--workers`` CPUs; ``--ray-address auto`` (or
``ray://HOST:PORT``) joins a running cluster, whose nodes must see the adapters at the same
paths (a shared file system) and have peftshield installed.
"""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np

from peftshield.screen.weights import AdapterFeatures

BATCH = 64  # adapters per actor call


class FeatureActor:
    """One Ray Data actor: the stage-1 features of a batch of targets (an error message for an unreadable one)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from peftshield.screen.run import features_or_error

        out: dict[str, list] = {"spec": [], "error": [], "features": []}
        for spec in batch["spec"]:
            spec = str(spec)
            item = features_or_error(spec)
            if isinstance(item, str):
                payload, error = "", item
            else:
                payload = json.dumps({"folder": item.folder, "cohort": item.cohort, "names": item.names, "values": item.values.tolist(),
                                      "modules": item.modules})
                error = ""
            out["spec"].append(spec)
            out["error"].append(error)
            out["features"].append(payload)
        return {key: np.array(values, dtype=object) for key, values in out.items()}


def ray_features(specs: list[str], address: str | None = None, workers: int | None = None) -> Iterator[tuple[str, AdapterFeatures | str]]:
    """``(spec, features or error message)`` for every spec, computed on Ray, in the order given."""
    from peftshield.grid.executors import RayExecutor

    ray = RayExecutor(workers=workers, address=address).connect()
    dataset = ray.data.from_items([{"spec": spec} for spec in specs])
    dataset = dataset.map_batches(FeatureActor, batch_size=BATCH, concurrency=max(1, workers or 2), batch_format="numpy", num_cpus=1)
    found: dict[str, AdapterFeatures | str] = {}
    for row in dataset.iter_rows():
        if row["error"]:
            found[row["spec"]] = row["error"]
        else:
            payload = json.loads(row["features"])
            found[row["spec"]] = AdapterFeatures(payload["folder"], payload["cohort"], payload["names"], np.asarray(payload["values"]),
                                                 payload["modules"])
    for spec in specs:
        yield spec, found.get(spec, "not returned by the Ray workers")
