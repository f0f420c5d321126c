"""``peftshield serve`` at 4x its capacity: is overload shed, and does the service recover?

1. Capacity: 64 closed-loop clients for 15 s against the real service (bench/serve_load.py's
   models and runtime), one text per request: C texts/s.
2. Overload: open-loop arrivals (a seeded Poisson process, one text per request) at 4 x C for
   30 s. With the default limits (``--max-queue 256`` texts, ``--request-timeout-s 10``) the
   accepted requests must meet their deadline and the others must get 503 quickly.
3. Recovery: the load drops to 0.5 x C for 20 s: every request should be answered at once.

Adds ``overload`` to bench/serve.json and re-renders bench/serve.md (its "Overload" table).

    .venv/bin/python bench/serve_overload.py [--work runs/serve-bench]
"""

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import serve_load  # noqa: E402  (the models, the service launcher and the closed-loop driver)


async def open_loop(url: str, texts: list[str], rate: float, seconds: float, rng: np.random.Generator) -> dict:
    """Arrivals at ``rate`` per second (exponential gaps), each one POST of one text; every
    answer's status and latency recorded, whatever happens to the others."""
    import aiohttp

    records: list[tuple[int, float, str | None]] = []  # status (0: transport error), seconds, retry-after
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def one(text: str) -> None:
            begun = time.perf_counter()
            try:
                async with session.post(url + "/v1/classify", json={"texts": [text]}) as response:
                    await response.read()
                    records.append((response.status, time.perf_counter() - begun, response.headers.get("Retry-After")))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                records.append((0, time.perf_counter() - begun, None))

        tasks = []
        started = time.perf_counter()
        next_at, i = started, 0
        while next_at < started + seconds:
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(texts[i % len(texts)])))
            i += 1
            next_at += float(rng.exponential(1.0 / rate))
        sent_seconds = time.perf_counter() - started
        await asyncio.gather(*tasks)
    statuses = [s for s, _, _ in records]

    def pct(values: list[float], q: float) -> float:
        return round(float(np.percentile(np.array(values) * 1000, q)), 1) if values else float("nan")

    ok = [t for s, t, _ in records if s == 200]
    shed = [t for s, t, _ in records if s == 503]
    retry = [int(r) for s, _, r in records if s == 503 and r and r.isdigit()]
    return {
        "offered_per_s": round(rate, 1), "sent": len(records), "sent_per_s": round(len(records) / sent_seconds, 1),
        "ok": statuses.count(200), "ok_per_s": round(statuses.count(200) / sent_seconds, 1), "shed_503": statuses.count(503),
        "deadline_504": statuses.count(504), "other_errors": sum(s not in (200, 503, 504) for s in statuses),
        "ok_p50_ms": pct(ok, 50), "ok_p99_ms": pct(ok, 99), "ok_max_ms": pct(ok, 100),
        "shed_p50_ms": pct(shed, 50), "shed_p99_ms": pct(shed, 99), "retry_after_s": sorted(set(retry))[:5],
    }


def render_section(o: dict) -> str:
    lines = [
        "## Overload: 4x capacity, then back to half",
        "",
        f"Command: `make bench-overload` (= `.venv/bin/python bench/serve_overload.py`), {o['date']}. The guard service ({o['runtime']}, "
        f"`--max-batch 64 --max-wait-ms 5`, defaults `--max-queue {o['max_queue']}` texts and `--request-timeout-s {o['deadline_s']:g}`), "
        f"capacity measured first with 64 closed-loop clients: **{o['capacity_texts_per_s']} texts/s**. Then open-loop Poisson arrivals, one text "
        "per request, from an aiohttp client on the same 2-core machine (it competes with the server for the CPU).",
        "",
        "| phase | offered req/s | sent req/s | answered 200 | 200/s | 503 | 504 | other errors | 200 p50 ms | 200 p99 ms | 200 max ms | 503 p50 ms | 503 p99 ms | Retry-After s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("overload", "recovery"):
        r = o[name]
        lines.append(f"| {name} | {r['offered_per_s']} | {r['sent_per_s']} | {r['ok']} | {r['ok_per_s']} | {r['shed_503']} | {r['deadline_504']} | "
                     f"{r['other_errors']} | {r['ok_p50_ms']} | {r['ok_p99_ms']} | {r['ok_max_ms']} | {r['shed_p50_ms']} | {r['shed_p99_ms']} | "
                     f"{', '.join(map(str, r['retry_after_s'])) or '-'} |")
    lines += ["", o["reading"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="runs/serve-bench")
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--out", default="bench/serve")
    parser.add_argument("--overload-seconds", type=float, default=30.0)
    parser.add_argument("--recovery-seconds", type=float, default=20.0)
    args = parser.parse_args()
    from peftshield.guard.settings import ServeSettings
    from peftshield.io import atomic_write_json, atomic_write_text

    work = Path(args.work)
    summary_path = Path(args.out + ".json")
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    runtime = summary.get("serve_runtime", "onnx-int8")
    if not (work / "victim" / "finetune.json").is_file():
        raise SystemExit(f"{work}: run 'make bench-serve' first (it builds the models)")
    defaults = ServeSettings(model=work / "victim", psim=work / "psim")
    texts = [t for pair in zip(*serve_load.evaluation_texts(Path(args.shared).resolve())) for t in pair]
    port = serve_load.free_port()
    url = f"http://127.0.0.1:{port}"
    process = serve_load.start([serve_load.PEFTSHIELD, "serve", "--model", str(work / "victim"), "--psim", str(work / "psim"), "--port", str(port),
                                "--runtime", runtime, "--max-batch", "64", "--max-wait-ms", "5"], url, work / "serve-overload.log")
    try:
        capacity = asyncio.run(serve_load.drive(url, texts, 64, 15))
        rate = capacity["texts_per_s"]
        print(f"capacity: {capacity}", flush=True)
        rng = np.random.default_rng(0)
        overload = asyncio.run(open_loop(url, texts, 4 * rate, args.overload_seconds, rng))
        print(f"overload: {overload}", flush=True)
        recovery = asyncio.run(open_loop(url, texts, 0.5 * rate, args.recovery_seconds, rng))
        print(f"recovery: {recovery}", flush=True)
    finally:
        exit_code = serve_load.stop(process)
    deadline_ms = defaults.request_timeout_s * 1000
    met = overload["ok_max_ms"] <= deadline_ms and overload["deadline_504"] == 0
    quick = overload["shed_p99_ms"] <= 250 if overload["shed_503"] else True
    clean = overload["other_errors"] == 0 and recovery["other_errors"] == 0
    recovered = recovery["ok"] == recovery["sent"]
    reading = (
        f"At 4x capacity the service answered {overload['ok']} requests ({overload['ok_per_s']}/s, "
        f"{overload['ok_per_s'] / rate:.0%} of the measured capacity) and shed {overload['shed_503']} with 503 "
        f"(p99 {overload['shed_p99_ms']} ms); the slowest accepted request took {overload['ok_max_ms']} ms against a deadline of {deadline_ms:.0f} ms "
        f"({'met' if met else 'NOT met'}); other errors: {overload['other_errors']}. At half capacity afterwards "
        f"{recovery['ok']} of {recovery['sent']} requests were answered (p99 {recovery['ok_p99_ms']} ms): "
        f"{'recovered at once' if recovered else 'NOT fully recovered'}. The service exited {exit_code} on SIGTERM."
    )
    summary["overload"] = {
        "date": time.strftime("%Y-%m-%d"), "runtime": runtime, "max_queue": defaults.max_queue, "deadline_s": defaults.request_timeout_s,
        "capacity_texts_per_s": rate, "capacity": capacity, "overload": overload, "recovery": recovery, "exit_code": exit_code,
        "accepted_met_deadline": met, "shed_quickly": quick, "no_other_errors": clean, "recovered": recovered, "reading": reading,
    }
    atomic_write_json(summary_path, summary)
    if "load" in summary:
        atomic_write_text(Path(args.out + ".md"), serve_load.render(summary))
    print(reading)


if __name__ == "__main__":
    main()
