"""The README's quickstart, run as written, timed: what a new user meets.

Takes the quickstart's bash block out of README.md, runs it with bash in an empty folder with
fresh caches (its own HOME, XDG and Hugging Face cache folders) and the installed environment's
``bin`` first on PATH, and records each command's wall time (from bash's trace), the audit's
verdict, the scan's flag count and the service's answer.

    .venv/bin/python bench/quickstart.py [--out bench/quickstart] [--fresh-clone]

``--fresh-clone`` (what ``make bench-quickstart`` runs) first clones this repository's HEAD into
the empty folder and runs ``make install`` there, timed: the whole path of a new user, with
the clone's own environment on PATH (pip's download cache is the machine's; nothing else is).

Writes bench/quickstart.json and bench/quickstart.md. Run it with nothing else busy: the
figure is a wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- --8<-- [start:quickstart] -->", "<!-- --8<-- [end:quickstart] -->"
TRACE = re.compile(r"^\+ (\d+\.\d+) (.*)$")


def quickstart_block(readme: Path) -> str:
    text = readme.read_text(encoding="utf-8")
    section = text[text.index(START):text.index(END)]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    if not match:
        raise SystemExit(f"{readme}: no bash block in the quickstart section")
    return match.group(1)


def step_times(trace: list[tuple[float, str]], finished: float) -> list[dict]:
    """Each traced peftshield command and the time until the next traced command (or the end);
    for ``serve``, started in the background, the time until the classify request is sent (its
    start-up, which the readiness loop waits for)."""
    ends = [t for t, _ in trace[1:]] + [finished]
    steps = []
    for index, (started, command) in enumerate(trace):
        if command.startswith("peftshield serve"):
            until = next((t for t, c in trace[index:] if c.startswith("curl -s localhost:8000/v1")), ends[index])
            steps.append({"command": "peftshield serve (until ready)", "seconds": round(until - started, 1)})
        elif command.startswith("peftshield") or command.startswith("curl -s localhost:8000/v1"):
            steps.append({"command": " ".join(command.split()[:2]), "seconds": round(ends[index] - started, 1)})
    return steps


def fresh_install(clone: Path, env: dict) -> dict:
    """Clone this repository's HEAD into ``clone`` and run ``make install`` there; the seconds each took."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    started = time.time()
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, env=env)
    cloned = time.time()
    machine = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}  # pip's own download cache included
    done = subprocess.run(["make", "install"], cwd=clone, env=machine, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"make install in the fresh clone failed (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return {"commit": commit, "clone_seconds": round(cloned - started, 1), "install_seconds": round(time.time() - cloned, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/quickstart")
    parser.add_argument("--fresh-clone", action="store_true", help="clone HEAD and run 'make install' in it first (timed)")
    args = parser.parse_args()
    from peftshield.io import atomic_write_json, atomic_write_text

    block = quickstart_block(ROOT / "README.md")
    with tempfile.TemporaryDirectory(prefix="peftshield-quickstart-") as folder:
        work = Path(folder)
        home = work / "home"
        env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "XDG_", "PEFTSHIELD_", "TRANSFORMERS_", "VIRTUAL_ENV"))}
        env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), XDG_CONFIG_HOME=str(home / ".config"))
        bin_dir, install = Path(sys.executable).parent, None
        if args.fresh_clone:
            install = fresh_install(work / "clone", env)
            bin_dir = work / "clone" / ".venv" / "bin"
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        script = work / "quickstart.sh"
        script.write_text("PS4='+ $(date +%s.%N) '\nset -x\n" + block)  # bash run as root takes no PS4 from the environment
        run = work / "run"
        run.mkdir()
        started = time.time()
        done = subprocess.run(["bash", str(script)], cwd=run, env=env, capture_output=True, text=True)
        finished = time.time()
        trace = [(float(m.group(1)), m.group(2)) for m in map(TRACE.match, done.stderr.splitlines()) if m]
        audit = json.loads((run / "qs/audit/audit.json").read_text()) if (run / "qs/audit/audit.json").is_file() else {}
        scanned = [json.loads(line) for line in (run / "qs/scan.jsonl").read_text().splitlines()] if (run / "qs/scan.jsonl").is_file() else []
        answer = next((line for line in done.stdout.splitlines() if line.startswith('{"request_id"')), None)
    summary = {
        "date": time.strftime("%Y-%m-%d"), "seconds": round(finished - started, 1), "bash_exit_code": done.returncode,
        "install": install,
        "steps": step_times(trace, finished),
        "audit_verdict": audit.get("verdict"), "audit_trigger": audit["triggers"][0]["text"] if audit.get("triggers") else None,
        "audit_target": audit["triggers"][0]["target"] if audit.get("triggers") else None,
        "scan_rows": len(scanned), "scan_flagged": sum(bool(row.get("flagged")) for row in scanned),
        "service_answer": json.loads(answer) if answer else None,
        "cpu": os.cpu_count(),
    }
    lines = [
        "# The README quickstart, run as written",
        "",
        f"Command: `make bench-quickstart` (= `.venv/bin/python bench/quickstart.py{' --fresh-clone' if install else ''}`), {summary['date']}: the README's quickstart block run by bash "
        f"in an empty folder with fresh caches, no `../shared`, on {summary['cpu']} CPU cores with nothing else running.",
        "",
        *([f"In a fresh clone of {install['commit'][:7]}: `git clone` {install['clone_seconds']:.0f} s, `make install` {install['install_seconds']:.0f} s "
           f"(pip's download cache is the machine's), then the quickstart with the clone's environment.", ""] if install else []),
        f"**Quickstart: {summary['seconds'] / 60:.1f} minutes** ({summary['seconds']:.0f} s)"
        + (f"; **from the clone to the served request: {(summary['seconds'] + install['clone_seconds'] + install['install_seconds']) / 60:.1f} minutes**." if install else "."),
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| `{step['command']}` | {step['seconds']:.0f} |" for step in summary["steps"]],
        "",
        f"The audit's verdict: {summary['audit_verdict']} (top trigger {summary['audit_trigger']!r} -> class {summary['audit_target']}); the scan flagged {summary['scan_flagged']} of {summary['scan_rows']} rows; "
        f"the service answered: {'yes' if summary['service_answer'] else 'no'}.",
        "",
    ]
    atomic_write_json(Path(args.out + ".json"), summary)
    atomic_write_text(Path(args.out + ".md"), "\n".join(lines))
    print("\n".join(lines))
    if done.returncode != 0 or not answer:
        print(done.stderr[-3000:], file=sys.stderr)


if __name__ == "__main__":
    main()
