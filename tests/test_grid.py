"""Experiment grids: config validation, cache keys, the SQLite store, resume after a kill,
the report, and the Ray executor, all on tiny random models and a few real SST-2 rows."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftshield.cli import main
from peftshield.errors import ConfigError
from peftshield.experiments.cache import stage_key
from peftshield.grid import ResultStore, load_grid_config
from peftshield.grid.executors import LocalExecutor
from peftshield.grid.runner import STORE_FILE, plan_grid, run_grid

ROOT = Path(__file__).resolve().parents[1]


DEFENSE_ENTRIES = {"psim": "{name: psim, options: {max_train_samples: 48}}", "strip": "{name: strip, options: {num_perturbations: 2}}"}


def write_config(path: Path, shared: Path, methods=("full", "lora"), defenses=("psim", "strip"), seeds=(0,), extra: str = "") -> Path:
    sst2 = shared / "psim" / "sst-2"
    path.write_text(f"""
name: tiny-grid
backbone: tiny
seeds: {list(seeds)}
max_length: 32
attack: {{data: {sst2}, samples: 48, poison_count: 16, epochs: 1, max_words: 20}}
triggers: [{{name: badnet, options: {{words: mn}}}}]
datasets: [{{name: sst-2, path: {sst2}}}]
methods: {list(methods)}
victim: {{samples: 48, epochs: 2, test_samples: 40, probe_samples: 16}}
defenses: [{", ".join(DEFENSE_ENTRIES[d] for d in defenses)}]
{extra}""", encoding="utf-8")
    return path


@pytest.mark.parametrize("edit, message", [
    ("colour: blue", "colour: unknown key"),
    ("victim: {epochs: 0}", "victim.epochs: Input should be greater than or equal to 1"),
    ("methods: [lora, qlora]", "unknown method(s) qlora"),
    ("defenses: [psim, magic]", "unknown defense 'magic'"),
    ("defenses: [{name: strip, options: {num_perturbatons: 2}}]", "defense 'strip': unknown option 'num_perturbatons'"),
    ("defenses: [{name: strip, options: {num_perturbations: many}}]", "defense 'strip': option 'num_perturbations': Input should be a valid integer"),
    ("defenses: [{name: psim, options: {threshold: {kind: sometimes}}}]", "defense 'psim': option 'threshold.kind': Input should be 'auto', 'fixed' or 'frr'"),
    ("defenses: [{name: psim, options: {method: qlora}}]", "unknown fine-tuning method 'qlora'"),
    ("defenses: [psim, {name: psim, options: {epochs: 2}}]", "defense labels must be unique"),
    ("triggers: [{name: emoji}]", "unknown trigger 'emoji'"),
    ("triggers: [{name: badnet, options: {num_triggers: 0}}]", "trigger 'badnet': option 'num_triggers': Input should be greater than or equal to 1"),
    ("attack: {data: x, learning_rate: fast}", "attack.learning_rate: Input should be a valid number"),
    ("psim: {methd: lora}", "psim.methd: unknown key"),
    ("name: ..", "name: String should match pattern"),
    ("name: a/b", "name: String should match pattern"),
    ("datasets: [{name: .., path: x}]", "datasets.0.name: String should match pattern"),
    ("triggers: [{name: syntactic, options: {pool: p.tsv}}]", "triggers.0: its texts come from a pool, which needs attack.label_mode: dirty"),
    ("triggers: [{name: syntactic, options: {pool: p.tsv}, attack: {label_mode: dirty}}]",
     "datasets.0.poisoned_test: triggers.0 draws its texts from a pool, which may hold texts the attacker trained on"),
])
def test_grid_config_errors_name_the_key(tmp_path: Path, shared_data: Path, edit: str, message: str) -> None:
    path = write_config(tmp_path / "grid.yaml", shared_data)
    key = edit.split(":")[0]
    lines = [line for line in path.read_text().splitlines() if not line.startswith(f"{key}:")]
    path.write_text("\n".join(lines + [edit]) + "\n")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_grid_config(path)


def test_grid_cli_bad_config_is_one_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nattack: [unclosed\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"peftshield: error: {bad}:") and "invalid YAML" in err[0]
    assert main(["report", str(tmp_path)]) == 2
    assert "not a grid run" in capsys.readouterr().err


def test_stage_keys_are_stable_and_content_addressed(tmp_path: Path, shared_data: Path) -> None:
    # a fixed payload has a fixed key: changing it breaks every user's cache, so it must be deliberate
    canonical = b'{"a":1,"b":[1,2],"kind":"backbone"}'  # sorted keys, no spaces
    assert stage_key("backbone", {"a": 1, "b": [1, 2]}) == "backbone-" + hashlib.sha256(canonical).hexdigest()[:16] == "backbone-5bf3b88db4f5cfdf"
    assert stage_key("backbone", {"b": [1, 2], "a": 1}) == stage_key("backbone", {"a": 1, "b": [1, 2]})
    assert stage_key("backbone", {"a": 2, "b": [1, 2]}) != stage_key("backbone", {"a": 1, "b": [1, 2]})
    config = load_grid_config(write_config(tmp_path / "a.yaml", shared_data))
    first, again = plan_grid(config, tmp_path / "run"), plan_grid(config, tmp_path / "elsewhere")
    assert [c.cell_key for c in first.cells] == [c.cell_key for c in again.cells], "keys do not depend on the run directory"
    longer = plan_grid(config.model_copy(update={"victim": config.victim.model_copy(update={"epochs": 3})}), tmp_path / "run")
    assert [c.backbone_key for c in longer.backbones] == [c.backbone_key for c in first.backbones]
    assert [c.defense_keys for c in longer.cells] == [c.defense_keys for c in first.cells], "the attack and PSIM are reused"
    assert not {c.victim_key for c in longer.cells} & {c.victim_key for c in first.cells}
    assert len(first.backbones) == 1 and len(first.cells) == 2, "one backbone shared by both methods"
    assert list(first.cells[0].defense_keys) == ["psim"], "PSIM is fitted on the backbone; STRIP scores with each victim"
    other_psim = load_grid_config(write_config(tmp_path / "b.yaml", shared_data).write_text(
        (tmp_path / "a.yaml").read_text().replace("max_train_samples: 48", "max_train_samples: 40")) and tmp_path / "b.yaml")
    changed = plan_grid(other_psim, tmp_path / "run")
    assert changed.cells[0].defense_keys["psim"] != first.cells[0].defense_keys["psim"], "a PSIM option is part of its key"
    assert changed.cells[0].victim_key == first.cells[0].victim_key


def test_release_0_1_psim_and_defense_options_sections_still_load(tmp_path: Path, shared_data: Path) -> None:
    path = write_config(tmp_path / "old.yaml", shared_data, extra="psim: {method: lora, learning_rate: 2.0e-4, samples: 48, threshold_mode: frr}\n"
                                                                   "defense_options: {strip: {num_perturbations: 3}}")
    path.write_text(path.read_text().replace("defenses: [", "defenses: [psim, strip]\n#"))
    config = load_grid_config(path)
    options = {d.label: d.options for d in config.defenses}
    assert options == {"psim": {"method": "lora", "learning_rate": 2e-4, "max_train_samples": 48,
                                "threshold": {"kind": "frr", "value": None, "target_frr": 0.01}},
                       "strip": {"num_perturbations": 3}}


def test_grid_run_store_rerun_and_report(tmp_path: Path, shared_data: Path) -> None:
    config = load_grid_config(write_config(tmp_path / "grid.yaml", shared_data))
    run_dir = tmp_path / "run"
    run_grid(config, run_dir, LocalExecutor(), progress=False, log=lambda _m: None)
    db = sqlite3.connect(run_dir / STORE_FILE)
    assert {r[1] for r in db.execute("PRAGMA table_info(cells)")} >= {"cell_key", "config_hash", "seed", "dataset", "trigger", "method", "versions", "seconds"}
    assert {r[1] for r in db.execute("PRAGMA table_info(results)")} == {"cell_key", "defense", "metric", "value"}
    assert db.execute("SELECT COUNT(*) FROM cells").fetchone()[0] == 2
    defenses = {r[0] for r in db.execute("SELECT DISTINCT defense FROM results")}
    assert defenses == {"none", "psim", "strip"}
    asr = db.execute("SELECT value FROM results WHERE defense='none' AND metric='attack_success_rate'").fetchall()
    assert len(asr) == 2
    versions = db.execute("SELECT versions FROM cells").fetchone()[0]
    assert '"peftshield"' in versions and '"torch"' in versions
    finished = dict(db.execute("SELECT cell_key, finished_at FROM cells").fetchall())
    db.close()
    header = (run_dir / "results.csv").read_text().splitlines()[0]
    assert header == "cell_key,config_hash,seed,dataset,trigger,method,defense,metric,value,seconds"

    messages: list[str] = []
    stages = {p.name: p.stat().st_mtime_ns for p in (run_dir / "stages").iterdir()}
    run_grid(config, run_dir, LocalExecutor(), progress=False, log=messages.append)
    assert "2 already stored" in messages[0] and "0 cells computed" in messages[-1]
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "stages").iterdir()} == stages
    assert {c["cell_key"]: c for c in ResultStore(run_dir / STORE_FILE).cells()}.keys() == finished.keys()

    assert main(["report", str(run_dir)]) == 0
    report = (run_dir / "report" / "report.md").read_text()
    assert "| sst-2 | badnet-mn |" in report and "| full | lora |" in report.replace("| dataset | trigger ", "")
    for png in ("asr_per_method.png", "asr_over_epochs.png", "confidence_sst-2_badnet-mn_lora_seed0.png", "roc_sst-2_badnet-mn_lora_seed0.png"):
        assert (run_dir / "report" / png).read_bytes()[:4] == b"\x89PNG"
    assert "<table>" in (run_dir / "report" / "report.html").read_text()
    assert main(["export", str(run_dir), "--csv", str(tmp_path / "out.csv")]) == 0
    assert (tmp_path / "out.csv").read_text() == (run_dir / "results.csv").read_text()


def stored_cells(store: Path) -> int:
    """The cells a running grid has stored so far (0 while its file exists but its tables do not yet)."""
    try:
        return sqlite3.connect(store).execute("SELECT COUNT(*) FROM cells").fetchone()[0]
    except sqlite3.OperationalError:  # created, its schema not yet written
        return 0


def test_grid_resumes_after_a_kill_without_recomputing_or_duplicating(tmp_path: Path, shared_data: Path) -> None:
    config_path = write_config(tmp_path / "grid.yaml", shared_data, methods=("lora", "ia3", "prompt", "full"), defenses=("psim",))
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "peftshield", "run", str(config_path), "--out", str(run_dir), "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    store = run_dir / STORE_FILE
    while time.time() < deadline and process.poll() is None:
        if store.is_file() and stored_cells(store) >= 1:
            break
        time.sleep(0.1)
    assert process.poll() is None, "the run finished before it could be killed: make the grid bigger"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = dict(sqlite3.connect(store).execute("SELECT cell_key, finished_at FROM cells").fetchall())
    assert 1 <= len(before) < 4
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert f"({len(before)} already stored)" in finished.stderr
    db = sqlite3.connect(store)
    after = dict(db.execute("SELECT cell_key, finished_at FROM cells").fetchall())
    assert len(after) == 4 and all(after[k] == v for k, v in before.items()), "finished cells must not be recomputed"
    assert not list((run_dir / "stages").glob(".*.tmp")), "half-built stages of the killed run are cleaned up"
    rows = db.execute("SELECT COUNT(*), COUNT(DISTINCT cell_key || defense || metric) FROM results").fetchone()
    assert rows[0] == rows[1] > 0, "no duplicated results"


def test_ray_executor_runs_two_tiny_cells(tmp_path: Path, shared_data: Path) -> None:
    ray = pytest.importorskip("ray")
    from peftshield.grid.executors import RayExecutor

    config = load_grid_config(write_config(tmp_path / "grid.yaml", shared_data, defenses=("psim",)))
    try:
        run_grid(config, tmp_path / "ray-run", RayExecutor(workers=2), progress=False, log=lambda _m: None)
    finally:
        ray.shutdown()
    run_grid(config, tmp_path / "local-run", LocalExecutor(), progress=False, log=lambda _m: None)
    by_ray = {(r["method"], r["defense"], r["metric"]): r["value"] for r in ResultStore(tmp_path / "ray-run" / STORE_FILE).rows()}
    local = {(r["method"], r["defense"], r["metric"]): r["value"] for r in ResultStore(tmp_path / "local-run" / STORE_FILE).rows()}
    assert len(ResultStore(tmp_path / "ray-run" / STORE_FILE).cells()) == 2
    assert by_ray.keys() == local.keys()
    for key in by_ray:
        if key[2] in ("clean_accuracy", "attack_success_rate", "defended_clean_accuracy", "defended_attack_success_rate"):
            assert by_ray[key] == pytest.approx(local[key], abs=1e-9), f"{key}: Ray and local runs must agree"


def test_tagged_entries_of_one_trigger_are_rows_of_their_own(tmp_path: Path, shared_data: Path) -> None:
    """configs/contrast-proportions.yaml's layout: the same trigger at several poison counts."""
    path = write_config(tmp_path / "c.yaml", shared_data)
    path.write_text(path.read_text().replace(
        "triggers: [{name: badnet, options: {words: mn}}]",
        "triggers: [{name: badnet, options: {words: mn}, tag: mn-few, attack: {poison_count: 4}},"
        " {name: badnet, options: {words: mn}, tag: mn-many, attack: {poison_count: 16}}]"))
    plan = plan_grid(load_grid_config(path), tmp_path / "run")
    assert len(plan.backbones) == 2 and {c.backbone_key for c in plan.backbones} == {c.backbone_key for c in plan.cells}
    assert sorted({(c.trigger_label, c.attack.poison_count) for c in plan.cells}) == [("mn-few", 4), ("mn-many", 16)]


@pytest.mark.parametrize("name", sorted(path.stem for path in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_validate(name: str) -> None:
    config = load_grid_config(ROOT / "configs" / f"{name}.yaml")
    assert config.name == name and plan_grid(config, ROOT / "runs" / name).cells


def test_a_second_process_on_the_same_run_folder_stops_with_the_holder_named(tmp_path: Path) -> None:
    from peftshield.experiments.cache import run_lock

    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from peftshield.experiments.cache import run_lock\n"
                               f"with run_lock({str(run_dir)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"in use by process {holder.pid} on .*; wait for it to finish, or pass --wait"):
            with run_lock(run_dir):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(run_dir):  # the holder is gone: its lock is taken over
        assert (run_dir / ".run.lock.owner").read_text().find(f'"pid": {os.getpid()}') >= 0


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_wait_waits(tmp_path: Path) -> None:
    from peftshield.experiments.cache import run_lock

    run_dir = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    run_dir.mkdir()
    (run_dir / ".run.lock").write_text("")
    (run_dir / ".run.lock.owner").write_text(f'{{"pid": {dead}, "host": "x", "command": "peftshield run", "started": "then"}}')
    with run_lock(run_dir):
        pass
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from peftshield.experiments.cache import run_lock\n"
                               f"with run_lock({str(run_dir)!r}):\n    print('held', flush=True); time.sleep(2)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    with run_lock(run_dir, wait=True):
        assert time.monotonic() - started > 1.0, "--wait acquires the lock only once the holder has released it"
    holder.wait()


def test_two_grid_runs_on_one_folder_the_second_is_refused_in_one_line(tmp_path: Path, shared_data: Path) -> None:
    """The folder held by one process (this test, through the runner's own lock: no race with a
    run that might finish first), a ``peftshield run`` on it is refused in one line naming the
    holder; once released, the same command runs."""
    import os

    from peftshield.experiments.cache import run_lock

    config_path = write_config(tmp_path / "grid.yaml", shared_data, methods=("lora",), defenses=("psim",))
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "peftshield", "run", str(config_path), "--out", str(run_dir), "--no-progress"]
    with run_lock(run_dir):
        second = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"in use by process {os.getpid()}" in lines[0], second.stderr
    assert subprocess.run(command, capture_output=True, text=True, timeout=600).returncode == 0


def test_a_stage_whose_files_do_not_match_its_record_is_rebuilt(tmp_path: Path) -> None:
    from peftshield.experiments.cache import StageCache

    cache = StageCache(tmp_path / "stages")
    calls = []

    def build(directory: Path) -> dict:
        calls.append(directory)
        (directory / "model").mkdir()
        (directory / "model" / "weights.bin").write_bytes(b"x" * 100)
        return {"n": len(calls)}

    assert cache.compute("victim-1", {}, build) == ({"n": 1}, False)
    assert cache.compute("victim-1", {}, build) == ({"n": 1}, True)
    (cache.path("victim-1") / "model" / "weights.bin").write_bytes(b"x" * 10)  # cut short
    assert cache.compute("victim-1", {}, build) == ({"n": 2}, False)
    (cache.path("victim-1") / "model" / "weights.bin").unlink()  # only stage.json left: not complete
    assert not cache.done("victim-1")
    assert cache.compute("victim-1", {}, build) == ({"n": 3}, False)
    assert not list((tmp_path / "stages").glob(".*.tmp"))


def test_a_ctrl_c_landing_as_the_stage_folder_is_made_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CPython runs a pending signal handler as a C call returns, so Ctrl-C can land just after
    mkdir made the temporary folder and before any build ran (a CI run under load did this)."""
    from peftshield.experiments.cache import StageCache

    cache = StageCache(tmp_path / "stages")
    real_mkdir = Path.mkdir

    def mkdir_then_interrupted(self: Path, *args, **kwargs) -> None:
        real_mkdir(self, *args, **kwargs)
        if self.name.endswith(".tmp"):
            raise KeyboardInterrupt

    monkeypatch.setattr(Path, "mkdir", mkdir_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.compute("victim-1", {}, lambda d: {})
    assert cache.root.is_dir() and not list(cache.root.glob(".*.tmp"))


def test_a_live_processs_temporary_stage_is_not_removed_a_dead_ones_is(tmp_path: Path) -> None:
    import socket

    from peftshield.experiments.cache import StageCache

    cache = StageCache(tmp_path / "stages")
    cache.root.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    live = cache.root / f".psim-1.{socket.gethostname()}-{os.getpid()}-aaaa.tmp"
    stale = cache.root / f".psim-1.{socket.gethostname()}-{dead}-bbbb.tmp"
    for folder in (live, stale):
        folder.mkdir()
        (folder / "partial.bin").write_bytes(b"1")
    cache.compute("psim-1", {}, lambda d: {})
    assert live.is_dir() and not stale.exists()


def test_a_trigger_word_with_a_slash_still_gets_a_report(tmp_path: Path, shared_data: Path) -> None:
    path = write_config(tmp_path / "grid.yaml", shared_data, methods=("lora",), defenses=("psim",))
    path.write_text(path.read_text().replace("words: mn", "words: m/n"))
    run_dir = tmp_path / "run"
    run_grid(load_grid_config(path), run_dir, LocalExecutor(), progress=False, log=lambda _m: None)
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report" / "confidence_sst-2_badnet-m_n_lora_seed0.png").is_file()
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == ["config.json", "report", "results.csv", "results.sqlite", "stages"]


def test_an_infeasible_cell_is_refused_before_any_training(tmp_path: Path, shared_data: Path) -> None:
    path = write_config(tmp_path / "grid.yaml", shared_data, methods=("lora",), defenses=("psim",))
    path.write_text(path.read_text().replace("poison_count: 16", "poison_count: 40"))
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "peftshield", "run", str(path), "--out", str(run_dir)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "poison_count 40 is more than the" in lines[0] and "trigger badnet-mn, seed 0" in lines[0], result.stderr
    assert not (run_dir / "stages").exists(), "nothing was trained"
    assert time.monotonic() - started < 60


def test_an_oversized_grid_needs_yes_and_the_log_keeps_its_prefix(tmp_path: Path, shared_data: Path) -> None:
    path = write_config(tmp_path / "grid.yaml", shared_data, methods=("lora",), defenses=("psim",), seeds=tuple(range(201)))
    result = subprocess.run([sys.executable, "-m", "peftshield", "run", str(path), "--out", str(tmp_path / "big")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "has 201 cells to run" in result.stderr and "pass --yes" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    small = write_config(tmp_path / "small.yaml", shared_data, methods=("lora",), defenses=("psim",))
    result = subprocess.run([sys.executable, "-m", "peftshield", "run", str(small), "--out", str(tmp_path / "small"), "--no-progress"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("[grid] tiny-grid: 1 cells (0 already stored)"), "the [grid] prefix is printed, not read as markup"
    assert "min at MiniLM speed" in result.stderr


def test_a_dataset_with_a_ready_made_triggered_test_file(tmp_path: Path, shared_data: Path) -> None:
    """HiddenKiller ships its syntactic test set already paraphrased: the grid takes it as the triggered set."""
    scpn_test = shared_data / "hiddenkiller" / "scpn" / "20" / "sst-2" / "test.tsv"
    path = write_config(tmp_path / "grid.yaml", shared_data, methods=("lora",), defenses=("psim",))
    text = path.read_text().replace("poison_count: 16,", "poison_count: 16, target_label: 1,")
    text = text.replace("datasets: [{name: sst-2, path: ", f"datasets: [{{name: sst-2, poisoned_test: {scpn_test}, path: ")
    path.write_text(text)
    config = load_grid_config(path)
    run_grid(config, tmp_path / "run", LocalExecutor(), progress=False, log=lambda _m: None)
    rows = {(r["defense"], r["metric"]): r["value"] for r in ResultStore(tmp_path / "run" / STORE_FILE).rows()}
    assert rows[("none", "n_poisoned")] == 40, "test_samples of the ready-made file, not trigger insertions"
    changed = plan_grid(config.model_copy(update={"datasets": [config.datasets[0].model_copy(update={"poisoned_test": None})]}), tmp_path / "run")
    assert changed.cells[0].cell_key != plan_grid(config, tmp_path / "run").cells[0].cell_key


def test_adding_a_defense_to_a_grid_evaluates_only_the_new_one(tmp_path: Path, shared_data: Path) -> None:
    """Each defense's evaluation of a victim is its own stage: a second config with one more
    defense is a new cell, but the victim and the first defense's evaluation are reused as they are."""
    run_dir = tmp_path / "run"
    first = load_grid_config(write_config(tmp_path / "one.yaml", shared_data, methods=("lora",), defenses=("strip",)))
    run_grid(first, run_dir, LocalExecutor(), progress=False, log=lambda _m: None)
    evaluations = {p.name: p.stat().st_mtime_ns for p in (run_dir / "stages").glob("evaluation-*")}
    assert len(evaluations) == 1
    second = load_grid_config(write_config(tmp_path / "two.yaml", shared_data, methods=("lora",), defenses=("strip", "psim")))
    run_grid(second, run_dir, LocalExecutor(), progress=False, log=lambda _m: None)
    after = {p.name: p.stat().st_mtime_ns for p in (run_dir / "stages").glob("evaluation-*")}
    assert len(after) == 2 and {k: after[k] for k in evaluations} == evaluations, "the first defense was evaluated again"
    cells = ResultStore(run_dir / STORE_FILE).cells()
    assert len(cells) == 2
    db = sqlite3.connect(run_dir / STORE_FILE)
    strip = db.execute("SELECT cell_key, value FROM results WHERE defense='strip' AND metric='detection_auroc'").fetchall()
    assert len(strip) == 2 and strip[0][1] == strip[1][1]
    assert db.execute("SELECT COUNT(*) FROM results WHERE defense='psim'").fetchone()[0] > 0
