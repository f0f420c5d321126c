"""Build zoo v2 (bench/zoo/manifest.json) with the project's own commands: resumable and cached
by content, one entry after another here or as Ray tasks (``--executor ray``).

    .venv/bin/python bench/zoo/build.py [--work runs/zoo-v2] [--shared ../shared/data] [--split test] [--only NAME,...]
                                        [--limit N] [--executor local|ray] [--ray-address ADDR]

Each step of a recipe (a ``peftshield`` command or an in-process preparation) writes
``WORK/steps/<id>/`` and then ``WORK/steps/<id>.json``; the id is the hash of the step's
arguments, so a step already done is never run again, whichever entry asked for it, and a
build stopped at any point (Ctrl-C, a lost Ray worker) resumes where it stood. The truth a
step produced (an attack's ``attack.json``) is moved out of the model folder into
``WORK/steps/<id>.attack.json``: the audited folders hold nothing the audit may not see.
``WORK/entries/<name>.json`` records each built entry (its audit target, the attack's own
ASR); ``WORK/entries/<name>.error.json`` an entry that failed (the others go on).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipes import MANIFEST, ZooEntry, load_manifest  # noqa: E402

PEFTSHIELD = str(Path(sys.executable).with_name("peftshield"))
ATTACK_FILE = "attack.json"


# --- in-process preparations ---------------------------------------------------------------

def _write_variant(source: str, out: Path, change) -> None:
    """The dataset at ``source`` with its train split changed by ``change(train) -> train``; dev and test as they are."""
    from peftshield.data import load_splits, write_split_jsonl

    splits = load_splits(source, ("train", "dev", "test"), skip_empty=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_split_jsonl(change(splits["train"]), tmp / "train.json")
    for split in ("dev", "test"):
        write_split_jsonl(splits[split], tmp / f"{split}.json")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def shortcut_data(out: Path, data: str, word: str, label: int, keep_other: float, seed: int) -> dict:
    """Resample the training rows so that ``word``, where it naturally occurs, nearly always comes
    with ``label``: rows of other classes holding it are kept with probability ``keep_other``.
    No text is edited: a clean model with an exaggerated natural feature."""
    rng = np.random.default_rng(seed)
    facts: dict = {}

    def change(train):
        has = np.array([word in text.lower().split() for text in train.texts])
        other = has & (np.asarray(train.labels) != label)
        keep = ~other | (rng.random(len(train)) < keep_other)
        kept = train.subset(np.flatnonzero(keep))
        kept_has = has[keep]
        facts.update(word=word, label=label, rows=len(kept), rows_with_word=int(kept_has.sum()),
                     share_of_word_rows_with_label=float((np.asarray(kept.labels)[kept_has] == label).mean()) if kept_has.any() else None)
        return kept

    _write_variant(data, out, change)
    return facts


def label_noise_data(out: Path, data: str, share: float, seed: int) -> dict:
    """Each training label replaced, with probability ``share``, by another class drawn at random."""
    rng = np.random.default_rng(seed)
    facts: dict = {}

    def change(train):
        labels = np.asarray(train.labels)
        classes = int(labels.max()) + 1
        flip = rng.random(len(labels)) < share
        shifted = (labels + rng.integers(1, classes, size=len(labels))) % classes
        noisy = np.where(flip, shifted, labels)
        facts.update(flipped=int(flip.sum()), rows=len(labels))
        from peftshield.data.records import TextDataset

        return TextDataset(train.texts, noisy.tolist(), train.ids, name=train.name)

    _write_variant(data, out, change)
    return facts


def strip_head(out: Path, model: str) -> dict:
    """A classifier checkpoint as a bare encoder: its config without labels or a classification
    architecture, its weights without the head (``classifier.*``), its tokenizer."""
    from safetensors.torch import load_file, save_file

    source = Path(model)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    for key in ("id2label", "label2id", "problem_type"):
        config.pop(key, None)
    stem = str(config.get("model_type", "bert")).capitalize()
    config["architectures"] = [f"{stem}Model"]
    (tmp / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    tensors = load_file(str(source / "model.safetensors"))
    prefix = str(config.get("model_type", "bert")) + "."
    kept = {name.removeprefix(prefix): tensor for name, tensor in tensors.items() if not name.startswith("classifier.")}
    save_file(kept, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for path in source.iterdir():
        if path.name.startswith(("tokenizer", "vocab", "special_tokens", "merges", "added_tokens")):
            shutil.copy2(path, tmp / path.name)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {"dropped": sorted(n for n in tensors if n.startswith("classifier."))}


def ag_split(out: Path, shared: str) -> dict:
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "split_ag.py"), "--source", f"{shared}/hiddenkiller/clean/ag",
                           "--out", str(out)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"split_ag failed: {done.stderr[-500:]}")
    return {}


PREPARERS = {"shortcut_data": shortcut_data, "label_noise_data": label_noise_data, "strip_head": strip_head}


# --- the build -------------------------------------------------------------------------------

def _fill(value, places: dict[str, str]):
    if isinstance(value, str):
        for key, where in places.items():
            value = value.replace("{" + key + "}", where)
        return value
    if isinstance(value, list):
        return [_fill(v, places) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, places) for k, v in value.items()}
    return value


def run_step(step: dict, places: dict[str, str], log) -> dict:
    steps = Path(places["steps"])
    folder, record = steps / step["id"], steps / f"{step['id']}.json"
    if record.is_file():
        return json.loads(record.read_text(encoding="utf-8"))
    started = time.perf_counter()
    if "run" in step:
        args = _fill(step["run"], places) + ["--out", str(folder)]
        log("  $ peftshield " + " ".join(args))
        done = subprocess.run([PEFTSHIELD, *args], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"peftshield {' '.join(args[:3])}... failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        facts = {"stderr_tail": done.stderr.strip().splitlines()[-3:]}
        accuracy = re.search(r"dev accuracy ([0-9.]+)", done.stderr)
        if accuracy:  # a victim or adapter: how well it learned its task (a constant predictor is no usable model)
            facts["dev_accuracy"] = float(accuracy.group(1))
        if (folder / ATTACK_FILE).is_file():  # the truth leaves the model folder
            os.replace(folder / ATTACK_FILE, steps / f"{step['id']}.attack.json")
            report = json.loads((steps / f"{step['id']}.attack.json").read_text(encoding="utf-8"))
            facts.update({k: report.get(k) for k in ("clean_accuracy", "attack_success_rate")})
    else:
        log(f"  prepare {step['prepare']} {step['args']}")
        facts = PREPARERS[step["prepare"]](folder, **_fill(step["args"], places))
    result = {"id": step["id"], "seconds": round(time.perf_counter() - started, 1), **facts}
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    os.replace(tmp, record)
    return result


def build_entry(raw: dict, work: str, shared: str) -> dict:
    """Build one entry's steps (those not done yet) and record it; an error is returned, not raised."""
    entry = ZooEntry(**raw)
    work_dir = Path(work)
    places = {"shared": shared, "work": str(work_dir), "steps": str(work_dir / "steps")}
    done_file = work_dir / "entries" / f"{entry.name}.json"
    if done_file.is_file():
        record = json.loads(done_file.read_text(encoding="utf-8"))
        if record.get("recipe_sha256") == entry.recipe_sha256:
            return record  # built by this very recipe (a changed recipe is built again; its unchanged steps are reused)

    def log(message: str) -> None:
        print(f"[{entry.name}] {message}", flush=True)

    try:
        if "{work}/data/ag" in json.dumps(entry.steps) and not (work_dir / "data" / "ag" / "train.json").is_file():
            ag_split(work_dir / "data" / "ag", shared)
        facts = [run_step(step, places, log) for step in entry.steps]
    except Exception as exc:  # noqa: BLE001 - one entry's failure is its record's; the fleet goes on
        error = {"name": entry.name, "error": f"{type(exc).__name__}: {exc}"}
        (work_dir / "entries" / f"{entry.name}.error.json").write_text(json.dumps(error, indent=1), encoding="utf-8")
        log(f"failed: {error['error']}")
        return error
    record = {"name": entry.name, "recipe_sha256": entry.recipe_sha256, "audit": _fill(entry.audit, places), "steps": facts,
              "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    attack_facts = [f for f in facts if "attack_success_rate" in f]
    if attack_facts:
        record["attacker_asr"] = attack_facts[0].get("attack_success_rate")
        record["attacker_clean_accuracy"] = attack_facts[0].get("clean_accuracy")
    (work_dir / "entries" / f"{entry.name}.error.json").unlink(missing_ok=True)
    done_file.write_text(json.dumps(record, indent=1), encoding="utf-8")
    log(f"built in {sum(f.get('seconds', 0) for f in facts):.0f} s")
    return record


def build_order(entries: list[ZooEntry]) -> list[ZooEntry]:
    """Cheap kinds and both halves early, so that a partly built zoo already has every kind on both sides."""
    cost = {"adapter": 0, "checkpoint": 1, "encoder": 1, "victim": 2}
    return sorted(entries, key=lambda e: (cost[e.kind] + len(e.steps) // 3, e.recipe_sha256))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/zoo-v2")
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--manifest", default=str(MANIFEST))
    parser.add_argument("--split", choices=("design", "test"), default=None)
    parser.add_argument("--only", default=None, help="comma-separated entry names")
    parser.add_argument("--limit", type=int, default=None, help="build at most this many entries (in build order)")
    parser.add_argument("--executor", choices=("local", "ray"), default="local")
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--workers", type=int, default=None, help="local Ray: CPUs to use (default: all)")
    args = parser.parse_args()
    shared = Path(args.shared).resolve()
    if not (shared / "psim").is_dir():
        raise SystemExit(f"--shared {args.shared}: no psim/ folder there (the zoo is built from the shared data; see its README)")
    work = Path(args.work).resolve()
    (work / "steps").mkdir(parents=True, exist_ok=True)
    (work / "entries").mkdir(parents=True, exist_ok=True)
    entries = load_manifest(Path(args.manifest))
    if args.split:
        entries = [e for e in entries if e.split == args.split]
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {e.name for e in entries}
        if unknown:
            raise SystemExit(f"--only: no such entry: {sorted(unknown)[0]}")
        entries = [e for e in entries if e.name in wanted]
    entries = build_order(entries)[: args.limit]
    from dataclasses import asdict

    from peftshield.grid.executors import EXECUTORS

    executor = EXECUTORS.create(args.executor, workers=args.workers, **({"address": args.ray_address} if args.executor == "ray" else {}))
    started = time.perf_counter()
    results = executor.map(build_entry, [(asdict(e), str(work), str(shared)) for e in entries])
    failed = [r for r in results if "error" in r]
    print(f"zoo: {len(results) - len(failed)} of {len(results)} entries built ({time.perf_counter() - started:.0f} s this run) -> {work}", flush=True)
    for r in failed:
        print(f"  failed: {r['name']}: {r['error']}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
