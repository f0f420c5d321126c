"""Run a grid: plan its cells, compute each stage once (content-hash cache), store results.

The cells and their stages are the scenario's (:mod:`peftshield.experiments.scenario`);
this module only orders them for an executor (local or Ray) in three phases of
independent tasks, and writes each finished cell to the SQLite store:
1. weight-poisoned backbones, one per trigger and seed;
2. backbone-level defenses (PSIM: one per backbone, dataset and seed) and victims (one per
   backbone, dataset, method and seed);
3. cells: ``run_cell`` (the victim undefended and behind every defense), then the cell's
   rows written to the store in one transaction.
A task whose stage is already cached returns at once, so a killed run resumes where it
stopped, and cells already in the store are not recomputed. One process at a time works
in a run folder (a lock; a second one waits with ``--wait`` or stops with a one-line error).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftshield import __version__
from peftshield.experiments.cache import canonical_json, run_lock, stage_key
from peftshield.experiments.config import ScenarioConfig
from peftshield.experiments.scenario import (
    CellSpec,
    backbone_defense_stage,
    backbone_stage,
    plan_cells,
    run_cell,
    victim_stage,
)
from peftshield.grid.store import CellRecord, ResultStore

# Above this many cells a grid runs only with --yes (``confirmed``): 200 cells of the study's
# shape take days on a 2-core CPU.
LARGE_GRID_CELLS = 200
# Texts per second measured here (MiniLM, 2-core CPU; README "Results"), for the plan's estimate.
MEASURED_RATES = {"attack": 12.0, "full": 58.0, "peft": 83.0, "psim": 40.0, "inference": 220.0}
STORE_FILE = "results.sqlite"
CSV_FILE = "results.csv"
CONFIG_FILE = "config.json"


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"peftshield": __version__, "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


@dataclass
class GridPlan:
    config: ScenarioConfig
    run_dir: Path
    config_hash: str
    cells: list[CellSpec]

    def unique(self, key_of, cells: list[CellSpec] | None = None) -> list[CellSpec]:
        """The first cell of each distinct ``key_of(cell)``, in order."""
        seen: dict[str, CellSpec] = {}
        for cell in self.cells if cells is None else cells:
            seen.setdefault(key_of(cell), cell)
        return list(seen.values())

    @property
    def backbones(self) -> list[CellSpec]:
        return self.unique(lambda c: c.backbone_key)

    @property
    def backbone_defenses(self) -> list[tuple[CellSpec, str]]:
        pairs: dict[str, tuple[CellSpec, str]] = {}
        for cell in self.cells:
            for label, key in cell.defense_keys.items():
                pairs.setdefault(key, (cell, label))
        return list(pairs.values())


def estimate_seconds(plan: GridPlan, cells: list[CellSpec]) -> float:
    """A rough wall time for ``cells`` at the measured MiniLM rates (missing sizes count as 2,000 rows)."""
    rates, seconds = MEASURED_RATES, 0.0
    for cell in plan.unique(lambda c: c.backbone_key, cells):
        seconds += (cell.attack.samples or 2000) * cell.attack.epochs / rates["attack"]
    for cell in plan.unique(lambda c: c.victim_key, cells):
        seconds += (cell.victim.samples or 2000) * cell.victim.epochs / rates["full" if cell.method == "full" else "peft"]
    seconds += len({k for c in cells for k in c.defense_keys.values()}) * 2000 / rates["psim"]
    for cell in cells:
        seconds += 2 * (cell.victim.test_samples or 2000) * (1 + len(cell.defenses)) / rates["inference"]
    return seconds


def check_plan(plan: GridPlan, cells: list[CellSpec], confirmed: bool) -> None:
    """Before any training: refuse an oversized grid without ``confirmed`` and any cell that cannot run."""
    from peftshield.errors import ConfigError
    from peftshield.experiments.scenario import check_backbone_feasible, check_dataset_feasible

    if len(cells) > LARGE_GRID_CELLS and not confirmed:
        raise ConfigError(f"grid '{plan.config.name}' has {len(cells)} cells to run (about {estimate_seconds(plan, cells) / 3600:.0f} h at "
                          f"MiniLM speed on 2 CPU cores); pass --yes to run more than {LARGE_GRID_CELLS}")
    for cell in plan.unique(lambda c: c.backbone_key, cells):
        check_backbone_feasible(cell)
    for cell in plan.unique(lambda c: (c.backbone_key, c.dataset.name), cells):
        check_dataset_feasible(cell)


def plan_grid(config: ScenarioConfig, run_dir: str | Path) -> GridPlan:
    return GridPlan(config, Path(run_dir), stage_key("config", config.model_dump()), plan_cells(config))


def store_cell(cell: CellSpec, run_dir: str, config_hash: str, progress: bool) -> dict:
    """Phase 3 task: ``run_cell``, then the cell's rows in the store (skipped if stored)."""
    store = ResultStore(Path(run_dir) / STORE_FILE)
    if store.has_cell(cell.cell_key):
        return {"cell_key": cell.cell_key, "cached": True}
    result = run_cell(cell, run_dir, progress)
    train = result.victim_record["train_result"]
    epochs = [{"epoch": e["epoch"], **e.get("probe", {})} for e in train["epochs"]]
    store.save_cell(CellRecord(
        cell.cell_key, config_hash, cell.seed, cell.dataset.name, cell.trigger_label, cell.method, versions(),
        result.seconds, result.metrics,
        {"victim_key": cell.victim_key, "backbone_key": cell.backbone_key, "defense_keys": cell.defense_keys, "epochs": epochs,
         "best_epoch": train["best_epoch"]},
    ))
    return {"cell_key": cell.cell_key, "cached": False}


def _phase_two(kind: str, cell: CellSpec, label: str | None, run_dir: str, progress: bool) -> dict:
    if kind == "defense":
        return backbone_defense_stage(cell, label, run_dir, progress)
    return victim_stage(cell, run_dir, progress)


def run_grid(config: ScenarioConfig, run_dir: str | Path, executor, progress: bool = True, log=print, wait: bool = False,
             confirmed: bool = False) -> GridPlan:
    """Run every cell not yet stored, holding the run folder's lock."""
    with run_lock(run_dir, wait=wait):
        return run_grid_locked(config, run_dir, executor, progress, log, confirmed)


def run_grid_locked(config: ScenarioConfig, run_dir: str | Path, executor, progress: bool = True, log=print, confirmed: bool = False) -> GridPlan:
    """:func:`run_grid` for a caller that already holds the run folder's lock."""
    from peftshield.io import atomic_write_text

    plan = plan_grid(config, run_dir)
    run = str(Path(run_dir))
    Path(run).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(run) / CONFIG_FILE, canonical_json({"config_hash": plan.config_hash, "config": config.model_dump()}))
    store = ResultStore(Path(run) / STORE_FILE)
    todo = [c for c in plan.cells if not store.has_cell(c.cell_key)]
    check_plan(plan, todo, confirmed)
    log(f"[grid] {config.name}: {len(plan.cells)} cells ({len(plan.cells) - len(todo)} already stored), "
        f"{len(plan.backbones)} backbones, {len(plan.backbone_defenses)} backbone-level defenses -> {run}; "
        f"about {estimate_seconds(plan, todo) / 60:.0f} min at MiniLM speed on 2 CPU cores")
    needed_backbones = {c.backbone_key for c in todo}
    executor.map(backbone_stage, [(cell, run, progress) for cell in plan.backbones if cell.backbone_key in needed_backbones])
    needed_defenses = {key for c in todo for key in c.defense_keys.values()}
    executor.map(_phase_two, [("defense", cell, label, run, progress) for cell, label in plan.backbone_defenses
                              if cell.defense_keys[label] in needed_defenses]
                 + [("victim", cell, None, run, progress) for cell in plan.unique(lambda c: c.victim_key, todo)])
    done = executor.map(store_cell, [(cell, run, plan.config_hash, progress) for cell in todo])
    log(f"[grid] {sum(1 for d in done if not d['cached'])} cells computed; results in {Path(run) / STORE_FILE}")
    store.export_csv(Path(run) / CSV_FILE)
    return plan
