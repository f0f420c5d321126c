"""``peftshield screen`` on a labelled fleet, end to end (bench/screen.{json,md}).

Three parts, each run with the real CLI and recorded into bench/screen.json as it finishes
(``--parts`` picks them; a part run again replaces its own record only):

``zoo``
    The fleet is the **test half** of zoo v2's LoRA adapters (bench/zoo/manifest.json, entries
    of kind ``adapter`` and split ``test``, built by ``bench/zoo/build.py``), labelled by the
    manifest. Stage 1 and stage 2 at the defaults (``--audit-budget 10% --audit-sample 2%``),
    one process, a fresh audit cache. Recorded: stage 1's ranking of the backdoored adapters
    (AUROC, share of them in the top 10/25/50% of the fleet), the whole screen's recall (a
    backdoored adapter counts as caught when its audit exits 1: backdoored or inconclusive) and
    the share of clean adapters it flags, and its cost against auditing every adapter. The score
    stage 1 uses was fixed before the zoo was built; nothing is tuned here, so these are held-out
    figures for screen-score revision 1. The test half is looked at once per revision
    (bench/zoo/revisions.md).
``ray-local`` and ``ray-cluster``
    A fleet of ``--fleet-size`` adapters (the zoo's test-half adapters, copied round-robin:
    copies count once as peers, so its cohorts are the zoo's) through ``--executor ray``: a
    local Ray of 2 workers, then a real two-node cluster on this machine (``ray start --head``
    plus ``ray start --address``, one CPU each, token authentication), stopped afterwards.
    With ``--stage2`` both stages run (a fresh audit cache each time); without, stage 1.

    .venv/bin/python bench/screen.py [--parts zoo,ray-local,ray-cluster] [--fleet-size 200] [--stage2]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEFTSHIELD = str(Path(sys.executable).with_name("peftshield"))
RAY = str(Path(sys.executable).with_name("ray"))
RESULTS = BENCH / "screen.json"
CAUGHT = ("backdoored", "inconclusive")  # the verdicts that exit 1 under the default --fail-on inconclusive


def zoo_fleet(zoo: Path) -> tuple[list[str], dict[str, bool], list[str]]:
    """(adapter folders, {folder: backdoored}, names not built yet) of the zoo's test-half adapters."""
    manifest = json.loads((BENCH / "zoo" / "manifest.json").read_text())
    folders, labels, missing = [], {}, []
    for entry in manifest["entries"]:
        if entry["split"] != "test" or entry["kind"] != "adapter":
            continue
        built = zoo / "entries" / f"{entry['name']}.json"
        if not built.is_file():
            missing.append(entry["name"])
            continue
        folder = json.loads(built.read_text())["audit"]["adapter"]
        folders.append(folder)
        labels[folder] = bool(entry["backdoored"])
    return folders, labels, missing


def run_screen(targets: list[str], out: Path, extra: list[str], env: dict | None = None) -> tuple[dict, float, str]:
    manifest = out.with_suffix(".txt")
    manifest.write_text("".join(f"{t}\n" for t in targets))
    started = time.perf_counter()
    done = subprocess.run([PEFTSHIELD, "screen", "--manifest", str(manifest), "--out", str(out), "--no-progress", *extra],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1, 2) or not (out / "screen.json").is_file():
        raise SystemExit(f"screen failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads((out / "screen.json").read_text()), seconds, done.stderr.strip().splitlines()[-1]


def auroc(positive: list[float], negative: list[float]) -> float:
    """P(a backdoored adapter scores above a clean one), ties counted half."""
    pairs = [(p > n) + 0.5 * (p == n) for p in positive for n in negative]
    return sum(pairs) / len(pairs) if pairs else float("nan")


def ranking_figures(report: dict, labels: dict[str, bool]) -> dict:
    rows = report["rows"]
    score = {r["target"]: (float("inf") if r["score"] == "inf" else r["score"]) for r in rows if r["score"] is not None}
    rank = {r["target"]: r["rank"] for r in rows if r["rank"] is not None}
    backdoored = [t for t, bad in labels.items() if bad]
    clean = [t for t, bad in labels.items() if not bad]
    n = len(rows)
    at = {}
    for share in (0.10, 0.25, 0.50):
        k = -(-int(round(share * n * 1000)) // 1000)  # ceil without float noise
        at[f"top_{int(share * 100)}pct"] = {"k": k, "backdoored_in_top": sum(1 for t in backdoored if rank.get(t, n + 1) <= k)}
    verdict = {r["target"]: r["verdict"] for r in rows}
    audited = {r["target"]: r["audited"] for r in rows}
    return {
        "adapters": n, "backdoored": len(backdoored), "clean": len(clean),
        "no_peers": sum(r["status"] == "no-peers" for r in rows), "unreadable": sum(r["status"] == "error" for r in rows),
        "cohorts": len({r["cohort"] for r in rows if r["cohort"]}),
        "stage1_auroc": auroc([score[t] for t in backdoored if t in score], [score[t] for t in clean if t in score]),
        "stage1_top": at,
        "audited": sum(bool(a) for a in audited.values()),
        "audited_backdoored": sum(bool(audited[t]) for t in backdoored), "audited_clean": sum(bool(audited[t]) for t in clean),
        "caught_backdoored": sum(verdict[t] in CAUGHT for t in backdoored), "flagged_clean": sum(verdict[t] in CAUGHT for t in clean),
        "audit_verdicts": {t: verdict[t] for t in labels if audited[t]},
    }


def part_zoo(args, work: Path) -> dict:
    folders, labels, missing = zoo_fleet(ROOT / args.zoo)
    if not folders:
        raise SystemExit(f"no zoo v2 test-half adapter is built in {args.zoo}: run bench/zoo/build.py --split test first")
    cache = Path(tempfile.mkdtemp(prefix="screen-bench-cache-"))
    try:
        report, seconds, last_line = run_screen(folders, work / "zoo", ["--seed", "0"], {"PEFTSHIELD_CACHE_DIR": str(cache)})
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    figures = ranking_figures(report, {f: labels[f] for f in folders})
    audited = max(figures["audited"], 1)
    per_audit = report["stage2_seconds"] / audited
    whole = report["stage1_seconds"] + report["stage2_seconds"]
    return {
        "fleet": f"zoo v2 test half, adapters ({len(folders)} built of {len(folders) + len(missing)})", "missing": missing,
        "command": "peftshield screen --manifest ZOO-TEST.txt --seed 0 (defaults: --audit-budget 10% --audit-sample 2%), fresh audit cache",
        "wall_seconds": seconds, "stage1_seconds": report["stage1_seconds"], "stage2_seconds": report["stage2_seconds"],
        "seconds_per_audit": per_audit, "audit_every_adapter_seconds_estimated": per_audit * len(folders),
        "cost_ratio": whole / (per_audit * len(folders)) if report["stage2_seconds"] else None,
        "exit_code": report["exit_code"], "cli_summary": last_line, **figures,
    }


def start_two_nodes(token: Path) -> tuple[list[subprocess.Popen], dict, str]:
    """A head and a worker node on this machine (one CPU each), token-authenticated; returns the
    processes (each its own session, stopped by killing it), the client's environment and address."""
    port = 6390 + secrets.randbelow(200)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false", "--block",
                             "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while subprocess.run([RAY, "status", f"--address={address}"], env=env, capture_output=True).returncode != 0:
        if time.time() > deadline:
            raise SystemExit("the Ray head did not start in 120 s")
        time.sleep(2)
    worker = subprocess.Popen([RAY, "start", f"--address={address}", "--num-cpus=1", "--block"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while "2 node" not in nodes_line(address, env):
        if time.time() > deadline:
            raise SystemExit("the Ray worker did not join in 120 s")
        time.sleep(2)
    return [worker, head], env, address


def nodes_line(address: str, env: dict) -> str:
    status = subprocess.run([RAY, "status", f"--address={address}"], env=env, capture_output=True, text=True).stdout
    active = status.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return f"{sum(1 for line in active.splitlines() if line.strip().startswith('1 node'))} node"


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def part_ray(args, work: Path, cluster: bool) -> dict:
    folders, labels, missing = zoo_fleet(ROOT / args.zoo)
    if not folders:
        raise SystemExit(f"no zoo v2 test-half adapter is built in {args.zoo}")
    fleet_root = work / "fleet"
    targets = []
    for index in range(args.fleet_size):
        source = Path(folders[index % len(folders)])
        target = fleet_root / f"adapter-{index:04d}"
        if not target.is_dir():
            shutil.copytree(source, target)
        targets.append(str(target))
        labels[str(target)] = labels[str(source)]
    extra = ["--executor", "ray", "--seed", "0"] + ([] if args.stage2 else ["--stage1-only"])
    processes, env = [], {}
    cache = Path(tempfile.mkdtemp(prefix="screen-bench-cache-"))
    token = cache / "ray-token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    try:
        if cluster:
            processes, env, address = start_two_nodes(token)
            extra += ["--ray-address", address, "--workers", "2"]
        else:
            extra += ["--workers", "2"]
        report, seconds, last_line = run_screen(targets, work / ("cluster" if cluster else "local"), extra,
                                                {**env, "PEFTSHIELD_CACHE_DIR": str(cache / "audit")})
    finally:
        stop(processes)
        shutil.rmtree(cache, ignore_errors=True)
    figures = ranking_figures(report, {t: labels[t] for t in targets})
    # A fresh cache: an audited row marked cached is a copy that took its first copy's verdict.
    audits_run = sum(1 for r in report["rows"] if r["audited"] and not r["cached"])
    distinct = min(len(folders), args.fleet_size)
    whole = report["stage1_seconds"] + report["stage2_seconds"]
    every = report["stage2_seconds"] / audits_run * distinct if audits_run else None
    return {
        "audits_run": audits_run, "distinct_adapters": distinct,
        "cost_ratio": whole / every if every else None,
        "fleet": f"{args.fleet_size} adapters: the {len(folders)} built zoo v2 test-half adapters copied round-robin",
        "where": "a two-node Ray cluster on this machine (ray start --head + ray start --address, 1 CPU each)" if cluster else "a local Ray, 2 workers",
        "command": "peftshield screen --manifest FLEET.txt " + " ".join("HEAD:PORT" if a.startswith("127.0.0.1") else a for a in extra),
        "ray_nodes": report["executor"].get("nodes"), "wall_seconds": seconds, "stage1_seconds": report["stage1_seconds"],
        "stage2_seconds": report["stage2_seconds"], "exit_code": report["exit_code"], "cli_summary": last_line,
        "adapters_per_hour_stage1": args.fleet_size / report["stage1_seconds"] * 3600, **figures,
    }


def render(results: dict) -> str:
    lines = ["# `peftshield screen` on a labelled fleet", "",
             "Recorded by `make bench-screen` (`bench/screen.py`); each part with its date. This machine: 2 CPU cores, nothing else "
             "running.", ""]
    zoo = results.get("zoo")
    if zoo:
        top = zoo["stage1_top"]
        lines += [
            f"## Zoo v2 test half ({zoo['date']})", "",
            f"Fleet: {zoo['fleet']}; {zoo['backdoored']} backdoored, {zoo['clean']} clean (labels from bench/zoo/manifest.json). "
            f"Command: `{zoo['command']}`. Held-out figures of screen-score revision 1 (nothing tuned on the zoo).", "",
            "| figure | value |", "|---|---|",
            f"| cohorts (base, rank, modules, features) | {zoo['cohorts']} |",
            f"| adapters without peers (cohort under 8: audited first) | {zoo['no_peers']} |",
            f"| stage-1 AUROC, backdoored vs clean | {zoo['stage1_auroc']:.2f} |",
        ]
        for key, label in (("top_10pct", "10%"), ("top_25pct", "25%"), ("top_50pct", "50%")):
            lines.append(f"| backdoored in stage 1's top {label} (top {top[key]['k']}) | {top[key]['backdoored_in_top']} of {zoo['backdoored']} |")
        lines += [
            f"| audited (budget + sample) | {zoo['audited']} ({zoo['audited_backdoored']} backdoored, {zoo['audited_clean']} clean) |",
            f"| **recall of the whole screen** (backdoored adapters whose audit exits 1) | **{zoo['caught_backdoored']} of {zoo['backdoored']}** |",
            f"| **clean adapters flagged by the whole screen** | **{zoo['flagged_clean']} of {zoo['clean']}** |",
            f"| stage 1 / stage 2 seconds | {zoo['stage1_seconds']:.1f} / {zoo['stage2_seconds']:.0f} |",
            f"| seconds per audit (stage 2 / audited) | {zoo['seconds_per_audit']:.0f} |",
            f"| cost of the whole screen / auditing every adapter (at that rate) | "
            f"{'-' if zoo['cost_ratio'] is None else format(zoo['cost_ratio'], '.2f')} |",
            "",
        ]
    for key, title in (("ray-local", "Through a local Ray"), ("ray-cluster", "Through a two-node Ray cluster")):
        part = results.get(key)
        if not part:
            continue
        lines += [
            f"## {title} ({part['date']})", "",
            f"Fleet: {part['fleet']}. Where: {part['where']}. Command: `{part['command']}`.", "",
            "| figure | value |", "|---|---|",
            f"| Ray nodes that did the work | {part['ray_nodes']} |",
            f"| wall seconds (process start to report) | {part['wall_seconds']:.1f} |",
            f"| stage 1 seconds / adapters per hour | {part['stage1_seconds']:.1f} / {part['adapters_per_hour_stage1']:,.0f} |",
            f"| stage 2 seconds (audited) | {part['stage2_seconds']:.0f} ({part['audited']}) |",
            *([f"| audits run (copies of one adapter are audited once) | {part['audits_run']} |",
               f"| cost of the whole screen / auditing each of the fleet's {part['distinct_adapters']} distinct adapters at this run's rate | "
               f"{part['cost_ratio']:.2f} |"] if part.get("cost_ratio") else []),
            f"| distinct cohorts; without peers | {part['cohorts']}; {part['no_peers']} |",
            f"| exit code | {part['exit_code']} |",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="zoo,ray-local,ray-cluster")
    parser.add_argument("--zoo", default="runs/zoo-v2")
    parser.add_argument("--work", default="runs/screen-zoo")
    parser.add_argument("--fleet-size", type=int, default=200)
    parser.add_argument("--stage2", action="store_true", help="ray parts: run stage 2 too")
    args = parser.parse_args()
    from peftshield.io import atomic_write_json, atomic_write_text

    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)  # each part's report folder is replaced whole by the screen it runs
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for part in args.parts.split(","):
        if part == "zoo":
            record = part_zoo(args, work)
        elif part in ("ray-local", "ray-cluster"):
            record = part_ray(args, work, cluster=part == "ray-cluster")
        else:
            raise SystemExit(f"--parts {part}: give zoo, ray-local or ray-cluster")
        results[part] = {"date": time.strftime("%Y-%m-%d %H:%M"), **record}
        atomic_write_json(RESULTS, results)
        atomic_write_text(BENCH / "screen.md", render(results))
        print(f"{part}: done ({record['wall_seconds']:.0f} s)", flush=True)
    print(render(results))


if __name__ == "__main__":
    main()
