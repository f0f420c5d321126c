"""Both stages on Ray, for fleets that outgrow one machine. Stage 1: Ray Data over the fleet's
targets, the features computed by a pool of actors (``map_batches`` with a callable class), the
results streamed back to the driver, which scores the fleet as
:func:`peftshield.screen.run.stage1` does. Stage 2: one Ray task per chosen adapter, each
holding one model in memory, writing its audit into the report's folder (the nodes share it).

``--executor ray`` starts a local Ray with ``--workers`` CPUs; ``--ray-address auto`` (or
``ray://HOST:PORT``) joins a running cluster, whose nodes must see the adapters at the same
paths (a shared file system) and have peftshield installed.
"""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np

from peftshield.screen.fleet import audit_record
from peftshield.screen.weights import AdapterFeatures

NODE_KEY = "node"  # each stage-1 row records the Ray node that read it

BATCH = 64  # adapters per actor call, at most
BATCHES_PER_ACTOR = 4  # a fleet is cut into at least this many batches per actor, so that every actor gets work


class FeatureActor:
    """One Ray Data actor: the stage-1 features of a batch of targets (an error message for an unreadable one)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from peftshield.screen.run import features_or_error

        import ray

        node = ray.get_runtime_context().get_node_id()
        out: dict[str, list] = {"spec": [], "error": [], "features": [], NODE_KEY: []}
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
            out[NODE_KEY].append(node)
        return {key: np.array(values, dtype=object) for key, values in out.items()}


def ray_features(specs: list[str], address: str | None = None, workers: int | None = None,
                 nodes: set[str] | None = None, progress: bool = False) -> Iterator[tuple[str, AdapterFeatures | str]]:
    """``(spec, features or error message)`` for every spec, computed on Ray, in the order given;
    ``nodes`` (when given) collects the ids of the Ray nodes that read them."""
    from peftshield.grid.executors import RayExecutor

    ray = RayExecutor(workers=workers, address=address).connect()
    actors = max(1, workers or 2)
    # Several small batches per actor, and one batch in flight per actor: an actor that is ready
    # first (on the head node, say) must not take the whole fleet before the others have started.
    batch = max(1, min(BATCH, -(-len(specs) // (actors * BATCHES_PER_ACTOR))))
    blocks = max(1, -(-len(specs) // batch))
    dataset = ray.data.from_items([{"spec": spec} for spec in specs], override_num_blocks=blocks)
    # A fixed pool (``concurrency`` is deprecated in Ray 2.60; the default pool autoscales from one actor).
    pool = ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1)
    dataset = dataset.map_batches(FeatureActor, batch_size=batch, compute=pool, batch_format="numpy", num_cpus=1)
    found: dict[str, AdapterFeatures | str] = {}
    from peftshield.progress import track

    for row in track(dataset.iter_rows(), "stage 1: weights on Ray", enabled=progress, total=len(specs)):
        if nodes is not None:
            nodes.add(str(row[NODE_KEY]))
        if row["error"]:
            found[row["spec"]] = row["error"]
        else:
            payload = json.loads(row["features"])
            found[row["spec"]] = AdapterFeatures(payload["folder"], payload["cohort"], payload["names"], np.asarray(payload["values"]),
                                                 payload["modules"])
    for spec in specs:
        yield spec, found.get(spec, "not returned by the Ray workers")


def audit_one(spec: str, settings, folder: str) -> dict:
    """One adapter's audit (a Ray task): its status and message; whatever goes wrong is its own
    ``error`` row, never the fleet's."""
    from pathlib import Path

    from peftshield.errors import PeftshieldError
    from peftshield.gate.audit_gate import run_audit_gate

    import ray

    node = ray.get_runtime_context().get_node_id()
    try:
        row = run_audit_gate([spec], settings, Path(folder)).report.rows[0]
        return {**audit_record(row), NODE_KEY: node}
    except PeftshieldError as exc:
        return {"status": "error", "message": str(exc), NODE_KEY: node}
    except Exception as exc:  # a hostile adapter may raise anything; the other audits go on
        return {"status": "error", "message": f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}", NODE_KEY: node}


def ray_audits(specs: list[str], settings, out, address: str | None = None, workers: int | None = None,
               nodes: set[str] | None = None, progress: bool = False, audit=audit_one) -> dict[str, dict]:
    """Each spec's audit as a Ray task (one CPU, one model in memory), written into ``out``/NN-name;
    ``{spec: {"status", "message", "cached"}}``; ``nodes`` (when given) collects the nodes that ran them.
    A task whose worker dies (and dies again on its one retry) is that adapter's error row.
    ``audit``: the task's function (:func:`audit_one`; tests pass one that crashes)."""
    from peftshield.gate.audit_gate import audit_folder_name
    from peftshield.grid.executors import RayExecutor
    from peftshield.progress import track

    out.mkdir(parents=True, exist_ok=True)
    ray = RayExecutor(workers=workers, address=address).connect()
    task = ray.remote(num_cpus=1, max_retries=1)(audit)  # a lost worker's audit runs again (its content cache makes that cheap)
    spec_of = {}
    for index, spec in enumerate(specs, 1):
        spec_of[task.remote(spec, settings, str(out / audit_folder_name(index, spec)))] = spec

    def finished():
        waiting = list(spec_of)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            try:
                yield spec_of[done[0]], ray.get(done[0])
            except ray.exceptions.RayError as exc:  # its worker died twice (out of memory, say): that adapter's error row
                reason = " ".join(str(exc).split())[:200]
                yield spec_of[done[0]], {"status": "error", "message": f"its audit's Ray worker failed ({type(exc).__name__}: {reason})",
                                         "cached": False, NODE_KEY: ""}

    results = dict(track(finished(), "stage 2: audits on Ray", enabled=progress, total=len(specs)))
    if nodes is not None:
        nodes.update(str(r[NODE_KEY]) for r in results.values() if r[NODE_KEY])
    return {spec: results[spec] for spec in specs}
