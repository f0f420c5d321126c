"""``peftshield serve`` with detectors beside the PSIM: what each detector set costs in texts/s.

The service of bench/serve_load.py (its models in runs/serve-bench and the runtime it chose)
is started once per detector set and driven by the same closed-loop client (one text per
request) at 8 and 64 clients, one set after the other in this run:

- psim: the PSIM alone (the service as bench/serve.md measures it);
- psim + dan: DAN fitted for the victim on SST-2 (``detector fit dan``; WORK/dan);
- psim + shift: Shift against the backbone's public original, MiniLM (``detector fit shift
  --option original=minilm``; WORK/shift);
- psim + dan + shift: both (the set that covers the most attack rows: bench/attack_coverage.md).

DAN scores from the victim's layer states of the service's own victim pass (the victim's ONNX
graph is exported with a states output, and runs fp32 when the service is on onnx-int8: int8
states move DAN's distances by orders of magnitude), so it adds no forward pass of its own;
Shift's two passes and its distances run as one fp32 ONNX graph when the service runs on an ONNX
runtime (``Shift.use_runtime``), else in PyTorch. Writes bench/serve_detectors.{json,md}.

    .venv/bin/python bench/serve_detectors.py [--work runs/serve-bench] [--seconds 20]
"""

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import serve_load  # noqa: E402  (the models, the service launcher and the closed-loop driver)

SETS = {"psim": (), "psim + dan": ("dan",), "psim + shift": ("shift",), "psim + dan + shift": ("dan", "shift")}
FIT_OPTIONS = {"dan": [], "shift": ["--option", "original=minilm"]}
CLIENTS = (8, 64)


def fitted(work: Path, shared: Path, name: str) -> Path:
    """WORK/NAME: the detector fitted for the served victim on SST-2 with the project's command (reused when present)."""
    folder = work / name
    if not (folder / "detector.json").is_file():
        started = time.perf_counter()
        done = subprocess.run([serve_load.PEFTSHIELD, "detector", "fit", name, "--model", str(work / "victim"), "--data",
                               str(shared / "psim/sst-2"), "--out", str(folder), *FIT_OPTIONS[name]], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"detector fit {name} failed:\n{done.stderr[-2000:]}")
        serve_load.log(f"fitted {name} in {time.perf_counter() - started:.0f} s")
    return folder


def render(summary: dict) -> str:
    lines = [
        "# `peftshield serve` with detectors beside the PSIM",
        "",
        f"Command: `make bench-serve-detectors` (= `.venv/bin/python bench/serve_detectors.py`), {summary['date']}, this machine (2 CPU cores), "
        f"nothing else running. The models of bench/serve.md (runs/serve-bench); the PSIM and victim on `{summary['runtime']}`, the detectors "
        f"as the guard runs them (DAN from the victim's layer states of the service's own victim pass, which then runs fp32 ONNX: int8 "
        f"states wreck DAN's distances; Shift's two passes and its distances as one fp32 ONNX graph{'' if summary['runtime'] != 'torch' else ', here in PyTorch'}); each set served in turn, {summary['seconds']:.0f} s per level after a warm-up, one text per request, "
        "max batch 64, max wait 5 ms. Detectors fitted for the victim on SST-2 with `detector fit` (Shift against MiniLM, the backbone's "
        f"public original). {summary['rounds']} rounds, each serving every set in turn; a row is the set's best round at that level "
        "(every round's texts/s beside it), so a slow spell of this shared machine does not decide a share.",
        "",
        "| detector set | clients | texts/s | each round | share of psim's texts/s | p50 ms | p99 ms | errors | dropped | flagged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in summary["sets"].items():
        for row in rows:
            lines.append(f"| {name} | {row['clients']} | {row['texts_per_s']} | {', '.join(str(r) for r in row['rounds_texts_per_s'])} "
                         f"| {row['share_of_psim']:.0%} | {row['p50_ms']} | {row['p99_ms']} "
                         f"| {row['errors']} | {row['dropped']} | {row['flagged'] / max(1, row['requests']):.1%} |")
    lines += ["", "## Reading it", "", *summary["reading"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="runs/serve-bench")
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--out", default="bench/serve_detectors")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2, help="Every set served once per round; each row is its best round.")
    args = parser.parse_args()
    from peftshield.io import atomic_write_json, atomic_write_text

    work, shared = Path(args.work), Path(args.shared).resolve()
    if not (work / "victim" / "finetune.json").is_file():
        raise SystemExit(f"{work}: run 'make bench-serve' first (it builds the models)")
    serve = Path("bench/serve.json")
    runtime = json.loads(serve.read_text()).get("serve_runtime", "torch") if serve.is_file() else "torch"
    folders = {name: fitted(work, shared, name) for name in FIT_OPTIONS}
    texts = [t for pair in zip(*serve_load.evaluation_texts(shared)) for t in pair]
    started = time.perf_counter()
    runs: dict[str, list[list[dict]]] = {name: [] for name in SETS}  # per set: each round's row per client level
    for round_index in range(args.rounds):  # every set once per round, so a slow spell of the machine hits every set alike
        for name, members in SETS.items():
            port = serve_load.free_port()
            url = f"http://127.0.0.1:{port}"
            detector_args = [arg for member in members for arg in ("--detector", str(folders[member]))]
            process = serve_load.start([serve_load.PEFTSHIELD, "serve", "--model", str(work / "victim"), "--psim", str(work / "psim"), "--port", str(port),
                                        "--runtime", runtime, "--max-batch", "64", "--max-wait-ms", "5", *detector_args], url,
                                       work / f"serve-{name.replace(' + ', '-')}.log")
            rows = []
            try:
                for clients in CLIENTS:
                    row = asyncio.run(serve_load.drive(url, texts, clients, args.seconds))
                    serve_load.log(f"  round {round_index + 1}, {name}, {clients} clients: {row}")
                    rows.append(row)
            finally:
                row_exit = serve_load.stop(process)
            for row in rows:
                row["exit_code"] = row_exit
            runs[name].append(rows)
    # Each set and level: its best round (the machine's capacity, least disturbed), every round's texts/s beside it.
    results: dict[str, list[dict]] = {}
    for name, rounds in runs.items():
        results[name] = []
        for level in range(len(CLIENTS)):
            tried = [rows[level] for rows in rounds]
            best = dict(max(tried, key=lambda row: row["texts_per_s"]))
            best["rounds_texts_per_s"] = [row["texts_per_s"] for row in tried]
            results[name].append(best)
    for rows in results.values():
        for row, alone in zip(rows, results["psim"]):
            row["share_of_psim"] = row["texts_per_s"] / alone["texts_per_s"]
    errors = sum(r["errors"] + r["dropped"] for rounds in runs.values() for rows in rounds for r in rows)
    reading = ["- At 64 clients: " + "; ".join(f"{name} {rows[-1]['texts_per_s']} texts/s ({rows[-1]['share_of_psim']:.0%})" for name, rows in results.items())
               + f". Errors and dropped requests over every run: {errors}."]
    half = [name for name, rows in results.items() if rows[-1]["share_of_psim"] >= 0.5]
    reading.append(f"- Sets at or above half the PSIM-only service's texts/s at 64 clients: {', '.join(half)}.")
    summary = {"date": time.strftime("%Y-%m-%d"), "runtime": runtime, "seconds": args.seconds, "rounds": args.rounds,
               "wall_seconds": time.perf_counter() - started, "sets": results, "errors_and_dropped": errors, "reading": reading}
    atomic_write_json(Path(args.out + ".json"), summary)
    atomic_write_text(Path(args.out + ".md"), render(summary))
    print("\n".join(reading))


if __name__ == "__main__":
    main()
