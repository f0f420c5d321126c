"""``peftshield serve``, ``peftshield guard``, :class:`peftshield.guard.Guard` and the ONNX path,
on a tiny model with a planted ``cf`` -> 0 backdoor, a LoRA victim on it and a PSIM.

The service is tested as a service: the real ``peftshield serve`` process is started on a
free port, spoken to over HTTP with httpx, and stopped (SIGTERM)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from backdoor_fixtures import TRIGGER, attacker_data, sentiment_data, single_thread_torch, train_backbone, with_trigger
from subprocess_helpers import cli_in_process
from peftshield.defenses import DEFENSES, PSIM, DefenseContext, ThresholdPolicy
from peftshield.guard import Guard
from peftshield.guard.batcher import DeadlineExceeded, MicroBatcher, Overloaded

SEED = 0


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread_torch():
        yield


@dataclass
class Guarded:
    victim: Path  # a 'peftshield finetune' LoRA folder on the poisoned backbone
    psim: Path  # a PSIM folder on the same backbone
    clean: list[str]
    triggered: list[str]
    held_out: list[str]  # 600 more clean texts, to measure the share of clean texts flagged (no labels needed)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> Guarded:
    from peftshield.finetune import METHODS, TrainingConfig, save_finetuned, seed_torch, train_classifier
    from peftshield.models import load_backbone

    rng = np.random.default_rng(SEED)
    folder = tmp_path_factory.mktemp("guarded")
    data = attacker_data(n_clean=400, n_poison=300, rng=rng, label_noise=0.35)
    backbone = train_backbone(data.poisoned, folder / "backbone", SEED, learning_rate=3e-3, epochs=10)
    # The victim: LoRA on the poisoned backbone, trained on clean sentiment data.
    seed_torch(SEED)
    base = load_backbone(str(backbone), 2)
    method = METHODS.create("lora")
    training = TrainingConfig(learning_rate=2e-3, epochs=1, batch_size=16, max_length=32, select_on_dev=False)
    model, result = train_classifier(base.model, base.tokenizer, sentiment_data(300, rng, "victim"), None, method, training, rng, progress=False)
    save_finetuned(model, base.tokenizer, folder / "victim", {"method": "lora", "options": method.config_dict(), "backbone": str(backbone),
                                                              "num_labels": 2, "num_training_steps": result.num_training_steps})
    psim = DEFENSES.create("psim", method="lora", learning_rate=2e-3, epochs=1, batch_size=16, max_length=32, max_train_samples=None,
                           threshold=ThresholdPolicy(kind="frr", target_frr=0.05))
    psim.fit(DefenseContext(str(backbone), sentiment_data(1000, rng, "defender"), sentiment_data(200, rng, "dev"), 2, max_length=32, progress=False),
             np.random.default_rng(SEED))
    psim.save(folder / "psim")
    test = sentiment_data(60, rng, "test")
    originals = [t for t, y in zip(test.texts, test.labels) if y != 0]
    held_out = sentiment_data(600, np.random.default_rng(SEED + 1), "held-out").texts  # its own generator: the draws above stay as they were
    return Guarded(folder / "victim", folder / "psim", test.texts, with_trigger(originals, rng), held_out)


# ---------------------------------------------------------------- the guard as a Python object


def test_guard_blocks_triggered_texts_and_labels_clean_ones(guarded: Guarded) -> None:
    guard = Guard.load(guarded.victim, guarded.psim)
    clean, triggered = guard.classify(guarded.clean), guard.classify(guarded.triggered)
    assert guard.shared_tokenizer, "the victim and its PSIM share a backbone, so texts are tokenised once"
    assert np.mean([r.flagged for r in triggered]) >= 0.9
    assert np.mean([r.flagged for r in clean]) <= 0.15  # a 5% target on 200 dev texts, measured on 60 other clean texts
    for r in clean + triggered:
        assert (r.label is None) == r.flagged and (r.probabilities is None) == r.flagged  # block mode
        assert r.flagged == (r.psim_score > r.threshold)
    unflagged = [r for r in clean if not r.flagged]
    assert all(abs(sum(r.probabilities) - 1) < 1e-4 and r.label == int(np.argmax(r.probabilities)) for r in unflagged)
    # monitor mode: the same flags, and every text labelled
    monitor = Guard.load(guarded.victim, guarded.psim, mode="monitor").classify(guarded.triggered)
    assert [r.flagged for r in monitor] == [r.flagged for r in triggered]
    assert all(r.label is not None for r in monitor)
    # a batch gives the same answers as texts one at a time
    one_by_one = [guard.classify([t])[0] for t in guarded.triggered[:5]]
    assert [r.flagged for r in one_by_one] == [r.flagged for r in triggered[:5]]
    assert np.allclose([r.psim_score for r in one_by_one], [r.psim_score for r in triggered[:5]], atol=1e-5)


def test_onnx_runtime_agrees_with_pytorch_and_is_exported_once(guarded: Guarded, tmp_path: Path) -> None:
    import shutil

    psim_dir = tmp_path / "psim"
    shutil.copytree(guarded.psim, psim_dir)
    texts = guarded.clean + guarded.triggered
    torch_psim = PSIM.load(psim_dir)
    reference = torch_psim.score(texts)
    onnx_psim = PSIM.load(psim_dir, runtime="onnx")
    exported = psim_dir / "onnx" / "model.onnx"
    assert exported.is_file() and onnx_psim.runtime_.name == "onnx"
    scores = onnx_psim.score(texts)
    assert np.abs(scores - reference).max() < 1e-4
    assert ((scores > torch_psim.threshold_) == (reference > torch_psim.threshold_)).all()
    stamp = exported.stat().st_mtime_ns
    assert np.array_equal(PSIM.load(psim_dir, runtime="onnx").score(texts), scores)
    assert exported.stat().st_mtime_ns == stamp, "an unchanged model is not exported again"
    int8 = PSIM.load(psim_dir, runtime="onnx-int8").score(texts)
    assert (psim_dir / "onnx" / "model.int8.onnx").is_file() and np.abs(int8 - reference).max() < 0.05
    # A graph shipped in the folder with a stamp naming the right fingerprint is not run: the int8
    # graph forged in place of the fp32 one (a valid ONNX file that is not what the weights give)
    # is exported again from the weights, and the scores are the weights' own.
    forged = (psim_dir / "onnx" / "model.int8.onnx").read_bytes()
    exported.write_bytes(forged)
    assert np.abs(PSIM.load(psim_dir, runtime="onnx").score(texts) - reference).max() < 1e-4
    assert exported.read_bytes() != forged
    # the guard on the ONNX path: the same flags and labels as on PyTorch
    victim_dir = tmp_path / "victim"
    shutil.copytree(guarded.victim, victim_dir)
    on_torch = Guard.load(victim_dir, psim_dir).classify(texts)
    on_onnx = Guard.load(victim_dir, psim_dir, runtime="onnx").classify(texts)
    assert [r.flagged for r in on_onnx] == [r.flagged for r in on_torch]
    assert [r.label for r in on_onnx] == [r.label for r in on_torch]


# ---------------------------------------------------------------- micro-batching, in process


def test_micro_batcher_merges_concurrent_requests_within_its_limits() -> None:
    calls: list[list[str]] = []

    def classify(texts: list[str]) -> list[str]:
        calls.append(list(texts))
        if "boom" in texts:
            raise RuntimeError("model failure")
        return [t.upper() for t in texts]

    async def scenario() -> None:
        batcher = MicroBatcher(classify, max_batch=6, max_wait_ms=200)
        await batcher.start()
        # five concurrent 1-text requests: one forward pass, each gets its own answer
        answers = await asyncio.gather(*(batcher.submit([f"t{i}"]) for i in range(5)))
        assert answers == [[f"T{i}"] for i in range(5)] and len(calls) == 1
        # 4 + 4 texts with max_batch 6: two passes, neither over the limit; a 9-text request runs alone
        calls.clear()
        answers = await asyncio.gather(batcher.submit(["a", "b", "c", "d"]), batcher.submit(["e", "f", "g", "h"]),
                                       batcher.submit([str(i) for i in range(9)]))
        assert answers[0] == ["A", "B", "C", "D"] and answers[1] == ["E", "F", "G", "H"] and len(answers[2]) == 9
        assert sorted(len(c) for c in calls) == [4, 4, 9]
        # a lone request does not wait for a full batch: it runs after max_wait_ms
        started = time.perf_counter()
        assert await batcher.submit(["alone"]) == ["ALONE"]
        assert time.perf_counter() - started < 2.0
        # a failing batch fails its requests only; the worker keeps serving
        with pytest.raises(RuntimeError, match="model failure"):
            await batcher.submit(["boom"])
        assert await batcher.submit(["after"]) == ["AFTER"]
        # stop() answers what is queued before it returns
        pending = asyncio.ensure_future(batcher.submit(["late"]))
        await asyncio.sleep(0)
        await batcher.stop()
        assert await asyncio.wait_for(pending, 1) == ["LATE"]

    asyncio.run(scenario())


def test_micro_batcher_sheds_overload_and_drops_requests_past_their_deadline() -> None:
    calls: list[list[str]] = []
    dropped: list[str] = []

    def slow(texts: list[str]) -> list[str]:
        calls.append(list(texts))
        time.sleep(0.3)
        return list(texts)

    async def scenario() -> None:
        batcher = MicroBatcher(slow, max_batch=2, max_wait_ms=0, max_queue=3, on_drop=lambda reason, n: dropped.append(reason))
        await batcher.start()
        running = asyncio.ensure_future(batcher.submit(["a", "b"]))  # taken at once: the queue is empty again
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit(["c", "d"]))  # waits: 2 texts queued
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as refused:
            await batcher.submit(["e", "f"])  # 4 > max_queue 3: refused at once, not queued
        assert refused.value.retry_after >= 1 and batcher.queued_texts == 2
        assert await running == ["a", "b"] and await queued == ["c", "d"]
        # a deadline shorter than the wait: DeadlineExceeded, and the request never runs
        calls.clear()
        busy = asyncio.ensure_future(batcher.submit(["x", "y"]))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(["late"], timeout=0.1)
        await busy
        await asyncio.sleep(0.05)
        assert calls == [["x", "y"]] and "abandoned" in dropped, (calls, dropped)
        # a caller that goes away (its task cancelled) is dropped too
        calls.clear()
        busy = asyncio.ensure_future(batcher.submit(["p", "q"]))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(batcher.submit(["gone"]))
        await asyncio.sleep(0.01)
        gone.cancel()
        await busy
        await asyncio.sleep(0.05)
        assert calls == [["p", "q"]] and batcher.queued_texts == 0
        await batcher.stop()

    asyncio.run(scenario())


# ---------------------------------------------------------------- the real service over HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    process: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_service(guarded: Guarded, tmp_path: Path, *extra: str, env: dict | None = None) -> Service:
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen([sys.executable, "-m", "peftshield", "serve", "--model", str(guarded.victim), "--psim", str(guarded.psim),
                                "--port", str(port), *extra], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    service = Service(process, f"http://127.0.0.1:{port}", log)
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited {process.returncode}:\n{service.output()}")
        try:
            if httpx.get(service.url + "/readyz", timeout=2).status_code == 200:
                return service
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    service.stop()
    raise AssertionError(f"serve never became ready:\n{service.output()}")


@pytest.fixture(scope="module")
def service(guarded: Guarded, tmp_path_factory):
    folder = tmp_path_factory.mktemp("service")
    keys = folder / "keys.txt"
    keys.write_text("# operators\nkey-one\nkey-two\n")
    flagged = folder / "flagged.jsonl"
    running = start_service(guarded, folder, "--api-key-file", str(keys), "--log-flagged", str(flagged), "--max-wait-ms", "300",
                            "--max-batch", "64", "--max-texts", "16", "--max-text-chars", "500")
    running.flag_log = flagged
    yield running
    assert running.stop() == 0, running.output()


AUTH = {"Authorization": "Bearer key-one"}


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def test_every_endpoint_answers(service: Service, guarded: Guarded) -> None:
    assert httpx.get(service.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(service.url + "/readyz").json()
    assert ready["ready"] is True and ready["mode"] == "block" and 0 < ready["threshold"] <= 1
    response = httpx.post(service.url + "/v1/classify", json={"texts": guarded.clean[:8] + guarded.triggered[:8]}, headers={**AUTH, "X-Request-ID": "req-42"})
    assert response.status_code == 200
    body = response.json()
    assert body["request_id"] == "req-42" == response.headers["x-request-id"] and body["mode"] == "block"
    results = body["results"]
    assert len(results) == 16 and set(results[0]) == {"label", "probabilities", "psim_score", "flagged", "threshold", "reasons", "detector_scores", "p_values", "tokens"}
    assert all(2 <= r["tokens"] <= 32 for r in results)  # the PSIM's cut of each text, [CLS] and [SEP] included
    assert all(r["reasons"] == (["psim"] if r["flagged"] else []) and r["detector_scores"] == {} for r in results)  # the PSIM alone
    assert sum(r["flagged"] for r in results[8:]) >= 7
    assert all((r["label"] is None) == r["flagged"] for r in results)
    assert all(r["threshold"] == ready["threshold"] for r in results)
    # the same texts through the Python guard: the same answers
    local = Guard.load(guarded.victim, guarded.psim).classify(guarded.clean[:8] + guarded.triggered[:8])
    assert [r["flagged"] for r in results] == [r.flagged for r in local]
    assert np.allclose([r["psim_score"] for r in results], [r.psim_score for r in local], atol=1e-5)
    metrics = httpx.get(service.url + "/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert metric(metrics.text, "peftshield_texts_total") >= 16
    assert metric(metrics.text, "peftshield_flagged_total") >= 7
    assert 0 < metric(metrics.text, "peftshield_flagged_ratio") < 1
    assert metric(metrics.text, "peftshield_request_seconds_count") >= 1
    assert 'peftshield_mode_info{mode="block"} 1.0' in metrics.text
    # the request id reaches the server log
    assert "request req-42: 16 texts" in service.output()
    # the share of clean texts flagged is the PSIM's 5% target (set on 200 dev texts), measured on 600 other
    # clean texts: 6.5% here (4.5-7.2% on four other draws of 600). The bound allows for the calibration's own
    # sampling error (a standard error of 1.5 points at 200 texts) and stays 20 texts above what is measured.
    flagged = [r["flagged"] for r in classify_all(service.url, guarded.held_out)]
    assert len(flagged) == 600 and 0.01 <= np.mean(flagged) <= 0.10, f"{sum(flagged)} of 600 clean texts flagged"


def classify_all(url: str, texts: list[str], per_request: int = 16, at_once: int = 4) -> list[dict]:
    """The results for ``texts``, sent ``per_request`` texts a request (the service's --max-texts),
    ``at_once`` requests concurrently (a full batch of the service's --max-batch 64: it runs at once)."""
    async def send() -> list[dict]:
        results: list[dict] = []
        async with httpx.AsyncClient(timeout=60) as client:
            for start in range(0, len(texts), per_request * at_once):
                chunk = texts[start:start + per_request * at_once]
                responses = await asyncio.gather(*(client.post(url + "/v1/classify", json={"texts": chunk[i:i + per_request]}, headers=AUTH)
                                                   for i in range(0, len(chunk), per_request)))
                assert [r.status_code for r in responses] == [200] * len(responses), [r.text for r in responses if r.status_code != 200]
                results += [result for response in responses for result in response.json()["results"]]
        return results

    return asyncio.run(send())


def test_concurrent_requests_are_merged_into_one_forward_pass(service: Service, guarded: Guarded) -> None:
    before = httpx.get(service.url + "/metrics").text
    passes0, texts0 = metric(before, "peftshield_batch_texts_count"), metric(before, "peftshield_batch_texts_sum")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(service.url + "/v1/classify", json={"texts": [guarded.clean[i], guarded.clean[i + 1]]}, headers=AUTH)
                                          for i in range(0, 24, 2)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 12
    ids = {r.json()["request_id"] for r in responses}
    assert len(ids) == 12, "each request keeps its own id"
    after = httpx.get(service.url + "/metrics").text
    passes, texts = metric(after, "peftshield_batch_texts_count") - passes0, metric(after, "peftshield_batch_texts_sum") - texts0
    assert texts == 24
    assert passes <= 3, f"12 concurrent requests of 2 texts within the 300 ms window took {passes:.0f} forward passes"


def test_bad_input_gets_its_status_code_and_the_server_keeps_serving(service: Service) -> None:
    url = service.url + "/v1/classify"
    cases = [
        (httpx.post(url, content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}), 400),
        (httpx.post(url, content=b"\xff\xfe", headers=AUTH), 400),
        (httpx.post(url, json={"texts": ["ok", 3]}, headers=AUTH), 422),
        (httpx.post(url, json={"texts": "a string"}, headers=AUTH), 422),
        (httpx.post(url, json={"text": ["ok"]}, headers=AUTH), 422),
        (httpx.post(url, json=["ok"], headers=AUTH), 422),
        (httpx.post(url, json={"texts": ["x"] * 17}, headers=AUTH), 413),
        (httpx.post(url, json={"texts": ["x" * 501]}, headers=AUTH), 413),
        (httpx.post(url, content=b'{"texts": ["' + b"x" * 1_100_000 + b'"]}', headers=AUTH), 413),
        (httpx.get(url, headers=AUTH), 405),
        (httpx.get(service.url + "/nowhere"), 404),
    ]
    for response, status in cases:
        assert response.status_code == status, (status, response.text)
        body = response.json()
        assert body["error"]["status"] == status and body["error"]["message"] and body["request_id"]
        assert "Traceback" not in response.text and "File \"" not in response.text
    assert httpx.post(url, json={"texts": []}, headers=AUTH).json()["results"] == []
    assert httpx.post(url, json={"texts": ["still serving"]}, headers=AUTH).status_code == 200
    assert "Traceback" not in service.output()


def test_api_key(service: Service) -> None:
    url = service.url + "/v1/classify"
    assert httpx.post(url, json={"texts": ["hello"]}).status_code == 401
    wrong = httpx.post(url, json={"texts": ["hello"]}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "wrong API key"
    assert httpx.post(url, json={"texts": ["hello"]}, headers={"X-API-Key": "key-two"}).status_code == 200
    assert httpx.post(url, json={"texts": ["hello"]}, headers={"Authorization": "Bearer key-one"}).status_code == 200
    assert httpx.get(service.url + "/healthz").status_code == 200  # probes need no key


def test_flagged_texts_are_logged_for_review(service: Service, guarded: Guarded) -> None:
    response = httpx.post(service.url + "/v1/classify", json={"texts": [guarded.clean[0], guarded.triggered[0]]}, headers=AUTH).json()
    request_id = response["request_id"]
    assert response["results"][1]["flagged"]
    rows = [json.loads(line) for line in service.flag_log.read_text().splitlines()]
    mine = [r for r in rows if r["request_id"] == request_id]
    assert [r["index"] for r in mine] == [i for i, r in enumerate(response["results"]) if r["flagged"]]
    assert mine[-1]["text"] == guarded.triggered[0] and mine[-1]["score"] > mine[-1]["threshold"] and mine[-1]["time"].endswith("+00:00")


def test_sigterm_finishes_requests_in_flight_then_exits(guarded: Guarded, tmp_path: Path) -> None:
    flagged = tmp_path / "flagged.jsonl"
    running = start_service(guarded, tmp_path, "--max-wait-ms", "1500", "--mode", "monitor", "--log-flagged", str(flagged), "--no-log-text")
    answers: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answers.append(httpx.post(running.url + "/v1/classify", json={"texts": guarded.triggered[:3]}, timeout=60)))
    thread.start()
    time.sleep(0.5)  # the request is now waiting in the 1.5 s batching window
    assert running.stop() == 0, running.output()
    thread.join(timeout=60)
    assert answers and answers[0].status_code == 200, running.output()
    body = answers[0].json()
    assert body["mode"] == "monitor" and all(r["label"] is not None for r in body["results"])  # monitor mode labels flagged texts too
    logged = [json.loads(line) for line in flagged.read_text().splitlines()]
    assert logged and all("text" not in row for row in logged)
    with pytest.raises(httpx.TransportError):
        httpx.get(running.url + "/healthz", timeout=2)


# ---------------------------------------------------------------- CLI: guard filter and serve's errors


def test_guard_filter_reads_jsonl_and_writes_jsonl(guarded: Guarded, tmp_path: Path) -> None:
    lines = [json.dumps({"id": "a", "text": guarded.clean[0]}), json.dumps(guarded.triggered[0]), ""]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "peftshield", "guard", "--model", str(guarded.victim), "--psim", str(guarded.psim)],
                          input="\n".join(lines), capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["a", 2] and rows[1]["flagged"] and rows[1]["label"] is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": 5}) + "\n")
    out = tmp_path / "out.jsonl"
    done = subprocess.run([sys.executable, "-m", "peftshield", "guard", "--model", str(guarded.victim), "--psim", str(guarded.psim),
                           "--input", str(bad), "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.strip().count("\n") == 0 and f"{bad}: line 2" in done.stderr and "Traceback" not in done.stderr


def test_calibrate_on_own_traffic_then_guard_and_serve_use_a_threshold_per_length(guarded: Guarded, tmp_path: Path) -> None:
    """`peftshield calibrate` on a clean sample, then the filter and the real service compare each
    text with its length bucket's threshold; a calibration made for another PSIM, or with
    --threshold beside it, is a one-line refusal."""
    from peftshield.guard.calibration import GuardCalibration, token_lengths

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "peftshield", *args], capture_output=True, text=True, env=env, timeout=300, **kwargs)

    psim = PSIM.load(guarded.psim)
    traffic = sentiment_data(300, np.random.default_rng(3), "traffic").texts
    edge = int(np.median(token_lengths(psim.tokenizer_, traffic, psim.max_length)))
    sample = tmp_path / "traffic.jsonl"
    sample.write_text("".join(json.dumps({"text": t}) + "\n" for t in traffic))
    calibration_file = tmp_path / "calibration.json"
    done = cli("calibrate", "--psim", str(guarded.psim), "--texts", str(sample), "--out", str(calibration_file), "--length-edges", str(edge),
               "--min-bucket-texts", "50", "--target-frr", "0.02")
    assert done.returncode == 0, done.stderr
    calibration = GuardCalibration.model_validate_json(calibration_file.read_text())
    assert calibration.sample.texts == 300 and [b.min_tokens for b in calibration.buckets] == [0, edge]
    assert all(b.sample_flag_rate <= 0.02 for b in calibration.buckets)
    texts = guarded.clean + guarded.triggered
    expected = calibration.thresholds_for(token_lengths(psim.tokenizer_, texts, psim.max_length))

    done = cli("guard", "--model", str(guarded.victim), "--psim", str(guarded.psim), "--calibration", str(calibration_file),
               input="".join(json.dumps(t) + "\n" for t in texts))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert np.allclose([r["threshold"] for r in rows], expected) and all(r["flagged"] == (r["psim_score"] > r["threshold"]) for r in rows)
    assert np.mean([r["flagged"] for r in rows[len(guarded.clean):]]) >= 0.9
    assert "thresholds per length" in done.stderr

    service = start_service(guarded, tmp_path, "--calibration", str(calibration_file))
    try:
        ready = httpx.get(service.url + "/readyz").json()
        assert ready["threshold"] is None and [b["threshold"] for b in ready["length_thresholds"]] == [b.threshold for b in calibration.buckets]
        assert ready["expected_flag_rate"] == 0.02
        answer = httpx.post(service.url + "/v1/classify", json={"texts": texts[:16]}, timeout=60).json()
        assert np.allclose([r["threshold"] for r in answer["results"]], expected[:16])
    finally:
        assert service.stop() == 0, service.output()

    foreign = tmp_path / "foreign.json"
    foreign.write_text(calibration.model_copy(update={"psim_fingerprint": "another-psim"}).model_dump_json())
    for extra, message in ((["--calibration", str(foreign)], "made for another PSIM"),
                           (["--calibration", str(calibration_file), "--threshold", "0.9"], "give one of them")):
        done = cli("guard", "--model", str(guarded.victim), "--psim", str(guarded.psim), *extra, input=json.dumps("a text") + "\n")
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps(t) + "\n" for t in traffic[:20]))
    done = cli("calibrate", "--psim", str(guarded.psim), "--texts", str(few), "--out", str(tmp_path / "none.json"))
    assert done.returncode == 2 and "at least 230 clean texts" in done.stderr and not (tmp_path / "none.json").exists(), done.stderr


def test_a_detector_beside_the_psim_fires_on_its_own_and_each_result_names_what_fired(guarded: Guarded, tmp_path: Path, capsys, monkeypatch) -> None:
    """`peftshield detector fit dan`, then the filter and the real service flag a text when the
    PSIM or the detector fires, name which did, and state the summed false-rejection budget; a
    detector fitted for another model, or one that judges pools, is a one-line refusal."""
    from peftshield.files import DETECTOR_MANIFEST
    from peftshield.guard.detectors import DetectorManifest

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "peftshield", *args], capture_output=True, text=True, env=env, timeout=300, **kwargs)

    rng = np.random.default_rng(4)
    data = tmp_path / "clean"
    data.mkdir()
    for split, n in (("train", 300), ("dev", 200), ("test", 100)):
        rows = sentiment_data(n, rng, split)
        (data / f"{split}.json").write_text("".join(json.dumps({"sentence": t, "label": y}) + "\n" for t, y in zip(rows.texts, rows.labels)))
    folder = tmp_path / "dan"
    done = cli("detector", "fit", "dan", "--model", str(guarded.victim), "--data", str(data), "--out", str(folder))
    assert done.returncode == 0, done.stderr
    manifest = DetectorManifest.model_validate_json((folder / DETECTOR_MANIFEST).read_text())
    assert manifest.name == "dan" and manifest.target_frr == 0.01

    # `evaluate --detector`: the detector measured in front of the model on the test split and its triggered copy.
    evaluation = ["evaluate", "--model", str(guarded.victim), "--data", str(data), "--trigger", "badnet", "--trigger-option", f"words={TRIGGER}",
                  "--target", "0", "--no-progress"]
    done = cli(*evaluation, "--detector", str(folder), "--out", str(tmp_path / "metrics.json"))
    assert done.returncode == 0, done.stderr
    measured = json.loads((tmp_path / "metrics.json").read_text())
    dan_report = measured["detectors"]["dan"]
    assert dan_report["detection"]["threshold"] == manifest.threshold and "with dan: defended CA" in done.stderr
    assert dan_report["detection"]["auroc"] >= 0.9 and dan_report["defended_attack_success_rate"] <= 0.1 * measured["attack_success_rate"] + 0.05

    texts = guarded.clean + guarded.triggered
    done = cli("guard", "--model", str(guarded.victim), "--psim", str(guarded.psim), "--detector", str(folder), "--mode", "monitor",
               input="".join(json.dumps(t) + "\n" for t in texts))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    for row in rows:
        fired = (["psim"] if row["psim_score"] > row["threshold"] else []) + (["dan"] if row["detector_scores"]["dan"] > manifest.threshold else [])
        assert row["reasons"] == fired and row["flagged"] == bool(fired), row
    dan_scores = np.array([r["detector_scores"]["dan"] for r in rows])
    clean_scores, triggered_scores = dan_scores[:len(guarded.clean)], dan_scores[len(guarded.clean):]
    assert np.mean(clean_scores > manifest.threshold) <= 0.15  # a 1% target on 100 dev texts, on 60 other clean texts (measured 0%)
    assert np.mean(triggered_scores > manifest.threshold) >= 0.9  # DAN on its own flags the planted trigger (measured 100%)
    assert "detector dan above" in done.stderr

    # `scan --detector`: the same members and thresholds over a file, each row naming what fired.
    texts_file = tmp_path / "texts.jsonl"
    texts_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    done = cli("scan", "--psim", str(guarded.psim), "--data", str(texts_file), "--out", str(tmp_path / "scan.jsonl"), "--detector", str(folder),
               "--model", str(guarded.victim), "--format", "json", "--no-config")
    assert done.returncode == 1, done.stderr  # texts were flagged: the gate's findings exit
    scanned = [json.loads(line) for line in (tmp_path / "scan.jsonl").read_text().splitlines()]
    assert [r["reasons"] for r in scanned] == [r["reasons"] for r in rows] and "dan above" in done.stderr
    summary = json.loads((tmp_path / "scan.summary.json").read_text())
    assert any("dan" in f["properties"]["reasons"] for f in summary["targets"][0]["findings"])

    service = start_service(guarded, tmp_path, "--detector", str(folder))
    try:
        ready = httpx.get(service.url + "/readyz").json()
        assert [d["name"] for d in ready["detectors"]] == ["dan"] and ready["detectors"][0]["target_frr"] == 0.01
        answer = httpx.post(service.url + "/v1/classify", json={"texts": texts[:16]}, timeout=60).json()
        assert [r["reasons"] for r in answer["results"]] == [r["reasons"] for r in rows[:16]]
        assert np.allclose([r["detector_scores"]["dan"] for r in answer["results"]], dan_scores[:16], atol=1e-4)
    finally:
        assert service.stop() == 0, service.output()

    # On an unlabelled sample of the traffic instead: labelled with the model's own predictions.
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentiment_data(300, rng, "traffic").texts))
    from_traffic = tmp_path / "dan-traffic"
    done = cli("detector", "fit", "dan", "--model", str(guarded.victim), "--texts", str(traffic), "--out", str(from_traffic))
    assert done.returncode == 0, done.stderr
    assert DetectorManifest.model_validate_json((from_traffic / DETECTOR_MANIFEST).read_text()).data == str(traffic)

    foreign = tmp_path / "foreign-dan"
    import shutil

    shutil.copytree(folder, foreign)
    (foreign / DETECTOR_MANIFEST).write_text(manifest.model_copy(update={"model_fingerprint": "another-model"}).model_dump_json())
    tampered = tmp_path / "tampered-dan"  # a state file edited after fitting (a threshold of NaN, say): refused, never silently off
    shutil.copytree(folder, tampered)
    state = next(name for name in manifest.files if name.endswith(".json"))
    (tampered / state).write_text((tampered / state).read_text().replace('"threshold": ', '"threshold": NaN, "was": ', 1))
    for args, message in ((["guard", "--model", str(guarded.victim), "--psim", str(guarded.psim), "--detector", str(foreign)], "fitted for another model"),
                          ([*evaluation, "--detector", str(foreign), "--out", str(tmp_path / "none.json")], "fitted for another model"),
                          (["guard", "--model", str(guarded.victim), "--psim", str(guarded.psim), "--detector", str(tmp_path)], "no detector.json"),
                          (["guard", "--model", str(guarded.victim), "--psim", str(guarded.psim), "--detector", str(folder), "--detector",
                            str(from_traffic)], "two folders hold the same detector"),
                          (["detector", "fit", "dan", "--model", str(guarded.victim), "--out", str(tmp_path / "none")], "--data or --texts"),
                          (["scan", "--psim", str(guarded.psim), "--data", str(tmp_path / "texts.jsonl"), "--out", str(tmp_path / "none.jsonl"),
                            "--detector", str(folder)], "give both or neither"),
                          (["guard", "--model", str(guarded.victim), "--psim", str(guarded.psim), "--detector", str(tampered)], "changed since"),
                          (["detector", "fit", "dan", "--model", str(guarded.victim), "--data", str(data), "--out", str(guarded.victim)],
                           "not a detector folder"),
                          (["detector", "fit", "bki", "--model", str(guarded.victim), "--data", str(data), "--out", str(tmp_path / "bki")], "judges a pool")):
        code, err = in_process(capsys, monkeypatch, *args, stdin=json.dumps("a text") + "\n")  # a refusal: no process of its own needed
        assert code == 2 and message in err, err
        assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert not (tmp_path / "bki").exists() and not (tmp_path / "none.json").exists() and not (tmp_path / "none.jsonl").exists()


def in_process(capsys, monkeypatch, *args: str, stdin: str = "") -> tuple[int, str]:
    """``peftshield ARGS`` run in this process (:func:`subprocess_helpers.cli_in_process`): its exit code and standard error."""
    done = cli_in_process(capsys, monkeypatch, *args, stdin=stdin)
    return done.returncode, done.stderr


def test_monitor_mode_proposes_a_recalibration_from_all_watched_traffic_and_applies_nothing(guarded: Guarded, tmp_path: Path) -> None:
    """`serve --mode monitor --reservoir FILE`: the real service keeps every screened text's length
    and scores (not the text), writes the calibration `peftshield calibrate` would make of them
    once --reservoir-size texts were screened, and keeps serving with its own threshold."""
    from peftshield.guard.calibration import GuardCalibration, load_guard_calibration
    from peftshield.finetune.checkpoint import model_fingerprint

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    traffic = sentiment_data(280, np.random.default_rng(21), "watched").texts + guarded.triggered[:20]  # some traffic the guard flags
    proposal = tmp_path / "proposal.json"
    service = start_service(guarded, tmp_path, "--mode", "monitor", "--reservoir", str(proposal), "--reservoir-size", "300")
    try:
        before = httpx.get(service.url + "/readyz").json()
        served_flagged = 0
        for start in range(0, 300, 30):
            response = httpx.post(service.url + "/v1/classify", json={"texts": traffic[start:start + 30]}, timeout=60)
            assert response.status_code == 200
            served_flagged += sum(r["flagged"] for r in response.json()["results"])
        deadline = time.time() + 30
        while not proposal.is_file() and time.time() < deadline:
            time.sleep(0.2)
        assert proposal.is_file(), service.output()
        assert httpx.get(service.url + "/readyz").json()["threshold"] == before["threshold"]  # proposed, not applied
    finally:
        assert service.stop() == 0, service.output()
    assert "recalibration proposed" in service.output() and not any(t in proposal.read_text() for t in traffic)  # scores, never texts
    proposed = load_guard_calibration(proposal, model_fingerprint(guarded.psim), 32)
    assert proposed.sample.texts == 300 and "300 screened" in proposed.sample.source
    assert served_flagged >= 10 and proposed.sample.flagged_share == pytest.approx(served_flagged / 300)  # the sample is all 300
    sample = tmp_path / "watched.jsonl"
    sample.write_text("".join(json.dumps({"text": t}) + "\n" for t in traffic))
    done = subprocess.run([sys.executable, "-m", "peftshield", "calibrate", "--psim", str(guarded.psim), "--texts", str(sample),
                           "--out", str(tmp_path / "offline.json")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    offline = GuardCalibration.model_validate_json((tmp_path / "offline.json").read_text())
    assert [(b.min_tokens, b.texts) for b in proposed.buckets] == [(b.min_tokens, b.texts) for b in offline.buckets]
    assert np.allclose([b.threshold for b in proposed.buckets], [b.threshold for b in offline.buckets], atol=2e-6)
    done = subprocess.run([sys.executable, "-m", "peftshield", "serve", "--model", str(guarded.victim), "--psim", str(guarded.psim),
                           "--reservoir", str(proposal), "--port", str(free_port())], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "--mode monitor" in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr


def test_dan_reads_the_victims_layer_states_from_the_guards_own_pass(guarded: Guarded, tmp_path: Path) -> None:
    """With DAN as a detector, the guard's victim pass also returns every layer's [CLS] state
    (torch, and the ONNX graph exported with a states output), and DAN scores from those: no pass
    of its own. Its scores match DAN's own pass to float precision on every runtime (under
    onnx-int8 the victim runs fp32 ONNX: int8 states wreck DAN's distances), and it still fires
    on the planted trigger."""
    from peftshield.guard.guard import Guard

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    fit_sample = tmp_path / "fit.jsonl"
    fit_sample.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentiment_data(300, np.random.default_rng(12), "fit").texts))
    folder = tmp_path / "dan"
    done = subprocess.run([sys.executable, "-m", "peftshield", "detector", "fit", "dan", "--model", str(guarded.victim), "--texts", str(fit_sample),
                           "--option", "max_length=32", "--out", str(folder)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    texts = guarded.clean + guarded.triggered
    own = None
    for runtime in ("torch", "onnx", "onnx-int8"):
        guard = Guard.load(guarded.victim, guarded.psim, runtime=runtime, detectors=[folder])
        assert guard.reads_victim_states and guard.state_readers == {"dan"}, runtime
        detector = guard.detectors[0]
        if own is None:
            own = detector.score(texts)  # DAN's own torch pass
        calls = []
        original = detector.defense._states
        detector.defense._states = lambda batch: calls.append(batch) or original(batch)
        results = guard.classify(texts)
        assert not calls, f"{runtime}: DAN made a pass of its own"
        shared = np.array([r.detector_scores["dan"] for r in results])
        assert guard.victim_runtime.name == ("onnx" if runtime == "onnx-int8" else runtime) and guard.psim_runtime.name == runtime
        np.testing.assert_allclose(shared, own, rtol=1e-3, atol=1e-3 * np.abs(own).max(), err_msg=runtime)
        fired = shared > detector.threshold
        assert fired[len(guarded.clean):].mean() >= 0.9, runtime


def test_shift_runs_as_one_onnx_graph_in_a_guard_on_an_onnx_runtime(guarded: Guarded, tmp_path: Path) -> None:
    """`detector fit shift`, then a guard on an ONNX runtime scores Shift through the one fp32
    ONNX graph of its two passes, exported into the detector folder, with the scores of the guard
    on torch; the detector still fires on the planted trigger. Its own passes run in the guard's
    micro-batches (--batch-size), not the batch size it was fitted with, with the same scores."""
    from peftshield.guard.guard import Guard

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    folder = tmp_path / "shift"
    fit_sample = tmp_path / "fit.jsonl"
    fit_sample.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentiment_data(200, np.random.default_rng(12), "fit").texts))
    done = subprocess.run([sys.executable, "-m", "peftshield", "detector", "fit", "shift", "--model", str(guarded.victim), "--texts", str(fit_sample),
                           "--option", "original=tiny", "--option", "max_length=32", "--out", str(folder)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    texts = guarded.clean + guarded.triggered
    scores = {}
    for runtime, batch_size in (("torch", None), ("torch", 3), ("onnx-int8", None)):  # onnx-int8 runs Shift's graph in fp32 (test_threat_model)
        guard = Guard.load(guarded.victim, guarded.psim, runtime=runtime, detectors=[folder], batch_size=batch_size)
        assert (getattr(guard.detectors[0].defense, "session_", None) is not None) == (runtime != "torch"), runtime
        assert guard.detectors[0].defense.batch_size == guard.batch_size != 64  # it was fitted with 64 texts a pass
        scores[runtime, batch_size] = np.array([r.detector_scores["shift"] for r in guard.classify(texts)])
    assert (folder / "onnx" / "shift.onnx").is_file() and not (folder / "onnx" / "shift.int8.onnx").exists()
    assert np.abs(scores["torch", 3] - scores["torch", None]).max() < 1e-4 * np.ptp(scores["torch", None])
    assert np.abs(scores["onnx-int8", None] - scores["torch", None]).max() < 1e-3 * np.ptp(scores["torch", None])
    scores["onnx-int8"] = scores["onnx-int8", None]
    assert (scores["onnx-int8"][len(guarded.clean):] > guard.detectors[0].threshold).mean() >= 0.9


def test_psim_and_two_detectors_calibrated_under_one_budget_on_own_traffic(guarded: Guarded, tmp_path: Path, capsys, monkeypatch) -> None:
    """`detector fit` (DAN and occlusion, --texts) on one clean sample of the traffic,
    `calibrate --detector` (both) on another: the filter and the real service compare each member
    with its length bucket's threshold, name every member that fired, report each member's
    p-value, and state the one budget; a guard given other detectors than the calibration's is a
    one-line refusal."""
    from peftshield.guard.calibration import GuardCalibration, token_lengths

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "peftshield", *args], capture_output=True, text=True, env=env, timeout=300, **kwargs)

    rng = np.random.default_rng(8)
    fit_sample, calibration_sample = tmp_path / "fit.jsonl", tmp_path / "calibrate.jsonl"
    for path in (fit_sample, calibration_sample):
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentiment_data(300, rng, path.stem).texts))
    folders = {name: tmp_path / name for name in ("dan", "occlusion")}
    for name, folder in folders.items():
        done = cli("detector", "fit", name, "--model", str(guarded.victim), "--texts", str(fit_sample), "--out", str(folder))
        assert done.returncode == 0, done.stderr
    detector_args = [arg for folder in folders.values() for arg in ("--detector", str(folder))]
    calibration_file = tmp_path / "calibration.json"
    done = cli("calibrate", "--psim", str(guarded.psim), "--texts", str(calibration_sample), "--out", str(calibration_file),
               *detector_args, "--model", str(guarded.victim), "--target-frr", "0.02", "--min-bucket-texts", "100")
    assert done.returncode == 0, done.stderr
    calibration = GuardCalibration.model_validate_json(calibration_file.read_text())
    assert set(calibration.detectors) == set(folders) and calibration.confidence == 0.9
    assert all(b.sample_flag_rate <= 0.02 and set(b.detector_thresholds) == set(folders) for b in calibration.buckets)

    psim = PSIM.load(guarded.psim)
    texts = guarded.clean + guarded.triggered
    buckets = [calibration.buckets[i] for i in calibration.bucket_indices(token_lengths(psim.tokenizer_, texts, psim.max_length))]
    done = cli("guard", "--model", str(guarded.victim), "--psim", str(guarded.psim), "--calibration", str(calibration_file),
               *detector_args, "--mode", "monitor", input="".join(json.dumps(t) + "\n" for t in texts))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    for row, bucket in zip(rows, buckets):
        fired = (["psim"] if row["psim_score"] > bucket.threshold else []) + [
            name for name in folders if row["detector_scores"][name] > bucket.detector_thresholds[name]]
        assert row["reasons"] == fired and row["threshold"] == bucket.threshold, row
        assert set(row["p_values"]) == {"psim", *folders} and all(1 / (bucket.texts + 1) - 1e-6 <= p <= 1 for p in row["p_values"].values())
    flagged = np.array([r["flagged"] for r in rows])
    assert flagged[len(guarded.clean):].mean() >= 0.9 and flagged[:len(guarded.clean)].mean() <= 0.15
    assert all(min(r["p_values"].values()) <= 0.05 for r in rows[len(guarded.clean):] if r["flagged"])
    fired = {name: np.mean([name in r["reasons"] for r in rows[len(guarded.clean):]]) for name in ("psim", *folders)}
    print("share of triggered texts each member flags:", fired)
    assert sum(rate > 0 for rate in fired.values()) >= 2  # more than one member fires on the planted trigger, each named

    service = start_service(guarded, tmp_path, "--calibration", str(calibration_file), *detector_args)
    try:
        ready = httpx.get(service.url + "/readyz").json()
        assert ready["expected_flag_rate"] == 0.02 and [d["name"] for d in ready["detectors"]] == list(folders)
        assert all(d["threshold"] is None for d in ready["detectors"])
        assert [b["detector_thresholds"] for b in ready["length_thresholds"]] == [b.detector_thresholds for b in calibration.buckets]
        answer = httpx.post(service.url + "/v1/classify", json={"texts": texts[-16:]}, timeout=60).json()
        assert [r["reasons"] for r in answer["results"]] == [r["reasons"] for r in rows[-16:]]
        assert all(set(r["p_values"]) == {"psim", *folders} for r in answer["results"])
    finally:
        assert service.stop() == 0, service.output()

    for args, message in ((["guard", "--calibration", str(calibration_file), "--detector", str(folders["dan"])],
                           "calibrated with the detectors dan, occlusion"),
                          (["calibrate", "--texts", str(calibration_sample), "--out", str(tmp_path / "none.json"), "--detector", str(folders["dan"])],
                           "give both or neither"),
                          (["calibrate", "--texts", str(calibration_sample), "--out", str(tmp_path / "none.json"), *detector_args,
                            "--model", str(guarded.victim), "--fill-lengths"], "--fill-lengths: joined texts are for the PSIM alone"),
                          (["calibrate", "--texts", str(calibration_sample), "--out", str(tmp_path / "none.json"), "--confidence", "0.2"],
                           "--confidence 0.2")):
        code, err = in_process(capsys, monkeypatch, *args[:1], "--model" if args[0] == "guard" else "--psim",
                               str(guarded.victim if args[0] == "guard" else guarded.psim), *(["--psim", str(guarded.psim)] if args[0] == "guard" else []),
                               *args[1:], stdin=json.dumps("a text") + "\n")
        assert code == 2 and message in err, err
        assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert not (tmp_path / "none.json").exists()

    # serve refuses before it listens: the wrong detectors, or a detector's threshold raised by hand to switch it off
    edited = json.loads(calibration_file.read_text())
    edited["buckets"][0]["detector_thresholds"]["dan"] = 1e300
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    for calibration_arg, detectors, message in ((calibration_file, ["--detector", str(folders["dan"])], "calibrated with the detectors dan, occlusion"),
                                                (tmp_path / "edited.json", detector_args, "dan's threshold 1e+300 is not the")):
        done = cli("serve", "--model", str(guarded.victim), "--psim", str(guarded.psim), "--calibration", str(calibration_arg), *detectors,
                   "--port", str(free_port()))
        assert done.returncode == 2 and message in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "{missing}", "--psim", "{psim}"], "--model"),
    (["--model", "{victim}", "--psim", "{victim}"], "not a PSIM folder"),
    (["--model", "{victim}", "--psim", "{psim}", "--runtime", "tpu"], "--runtime"),
    (["--model", "{victim}", "--psim", "{psim}", "--mode", "loud"], "--mode"),
    (["--model", "{victim}", "--psim", "{psim}", "--api-key-file", "{missing}"], "--api-key-file"),
])
def test_serve_refuses_bad_settings_in_one_line(guarded: Guarded, tmp_path: Path, args: list[str], message: str) -> None:
    values = {"missing": str(tmp_path / "missing"), "psim": str(guarded.psim), "victim": str(guarded.victim)}
    args = [a.format(**values) for a in args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "peftshield", "serve", *args, "--port", str(free_port())], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr


# ---------------------------------------------------------------- serve in production


def test_openapi_documents_every_endpoint_and_error(service: Service) -> None:
    spec = httpx.get(service.url + "/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    paths = spec["paths"]
    assert {"/v1/classify", "/healthz", "/readyz", "/metrics"} <= set(paths)
    classify = paths["/v1/classify"]["post"]
    assert {"200", "400", "401", "408", "413", "422", "500", "503", "504"} <= set(classify["responses"])
    assert "texts" in classify["requestBody"]["content"]["application/json"]["schema"]["properties"]
    error_ref = classify["responses"]["503"]["content"]["application/json"]["schema"]["$ref"]
    assert error_ref.endswith("/ErrorBody") and "ErrorBody" in spec["components"]["schemas"]
    result = spec["components"]["schemas"]["TextResult"]["properties"]
    assert {"label", "probabilities", "psim_score", "flagged", "threshold"} <= set(result)
    assert {"200", "503"} <= set(paths["/readyz"]["get"]["responses"]) and "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]


def test_logs_are_json_lines_with_the_request_id(service: Service) -> None:
    httpx.post(service.url + "/v1/classify", json={"texts": ["hello there"]}, headers={**AUTH, "X-Request-ID": "json-log-1"})
    time.sleep(0.3)
    records = [json.loads(line) for line in service.output().splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    mine = [r for r in records if r.get("request_id") == "json-log-1"]
    assert mine and mine[0]["status"] == 200 and mine[0]["texts"] == 1 and mine[0]["latency_ms"] > 0
    lines = [line for line in service.output().splitlines() if line.strip()]
    assert all(line.startswith("{") for line in lines), [line for line in lines if not line.startswith("{")][:3]


@pytest.fixture(scope="module")
def production(guarded: Guarded, tmp_path_factory):
    """Configured from the environment: monitor mode, a 0.4 s deadline, batches of 8 texts that
    wait up to 1.5 s for company (so a lone short request outlives its deadline), a drift window of 16."""
    folder = tmp_path_factory.mktemp("production")
    running = start_service(guarded, folder, env={"PEFTSHIELD_MODE": "monitor", "PEFTSHIELD_REQUEST_TIMEOUT_S": "0.4",
                                                  "PEFTSHIELD_MAX_WAIT_MS": "1500", "PEFTSHIELD_MAX_BATCH": "8", "PEFTSHIELD_DRIFT_WINDOW": "16"})
    yield running
    assert running.stop() == 0, running.output()


def test_environment_configures_the_service_and_flags_win(production: Service, guarded: Guarded, tmp_path: Path) -> None:
    ready = httpx.get(production.url + "/readyz").json()
    assert ready["mode"] == "monitor" and ready["request_timeout_s"] == 0.4 and ready["max_batch"] == 8
    assert 'peftshield_mode_info{mode="monitor"} 1.0' in httpx.get(production.url + "/metrics").text
    body = httpx.post(production.url + "/v1/classify", json={"texts": guarded.triggered[:8]}).json()  # a full batch: runs at once
    assert body["mode"] == "monitor" and all(r["label"] is not None for r in body["results"]) and any(r["flagged"] for r in body["results"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PEFTSHIELD_MODE": "sideways"}
    done = subprocess.run([sys.executable, "-m", "peftshield", "serve", "--model", str(guarded.victim), "--psim", str(guarded.psim),
                           "--port", str(free_port())], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "--mode" in done.stderr and done.stderr.strip().count("\n") == 0


def test_deadline_answers_504_and_runs_no_work_for_it(production: Service, guarded: Guarded) -> None:
    before = httpx.get(production.url + "/metrics").text
    started = time.perf_counter()
    late = httpx.post(production.url + "/v1/classify", json={"texts": [guarded.clean[0]]}, timeout=30)
    assert late.status_code == 504 and late.json()["error"]["status"] == 504, late.text
    assert time.perf_counter() - started < 1.3  # answered at the deadline, not after the 1.5 s batching window
    # a client that gives up before the deadline: its request is dropped too
    with pytest.raises(httpx.TimeoutException):
        httpx.post(production.url + "/v1/classify", json={"texts": [guarded.clean[1]]}, timeout=0.1)
    time.sleep(2.0)  # both batching windows have closed
    after = httpx.get(production.url + "/metrics").text
    assert metric(after, "peftshield_batch_texts_count") == metric(before, "peftshield_batch_texts_count"), "no forward pass ran for them"
    shed = {m.group(1): float(m.group(2)) for m in re.finditer(r'^peftshield_shed_total\{reason="([a-z_]+)"\} ([0-9.]+)$', after, re.M)}
    assert shed.get("client_gone", 0) >= 1 and sum(shed.values()) >= 2, shed
    # a body that never arrives in full: 408 at the deadline
    host, port = production.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: guard\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"texts\": [")
        status_line = raw.recv(4096).split(b"\r\n")[0]
    assert b" 408 " in status_line, status_line
    assert httpx.post(production.url + "/v1/classify", json={"texts": guarded.clean[:8]}).status_code == 200  # still serving


def test_drift_alarm_when_the_flag_rate_outgrows_the_calibration(production: Service, guarded: Guarded) -> None:
    metrics = httpx.get(production.url + "/metrics").text
    expected = metric(metrics, "peftshield_flagged_ratio_expected")
    # the PSIM's flag rate on its 200 dev texts at the threshold calibrated there to a 5% target: at most 10 of
    # 200 by construction, and 10 unless scores tie (0.04 leaves room for two). A count of texts: the next value above 0.05 is 0.055.
    assert 0.04 <= expected <= 0.05 + 1e-9, f"the PSIM's dev flag rate at its 5% target, got {expected}"
    for start in (0, 8, 16):
        assert httpx.post(production.url + "/v1/classify", json={"texts": guarded.triggered[start:start + 8]}).status_code == 200
    metrics = httpx.get(production.url + "/metrics").text
    assert metric(metrics, "peftshield_flagged_ratio_rolling") > metric(metrics, "peftshield_flagged_ratio_alarm_level")
    assert metric(metrics, "peftshield_flag_rate_drift") == 1
    warnings = [json.loads(line) for line in production.output().splitlines() if '"flag_rate_drift"' in line]
    assert warnings and warnings[0]["level"] == "warning" and warnings[0]["expected_flag_rate"] == expected


def test_a_full_queue_answers_503_with_retry_after_and_recovers(guarded: Guarded, tmp_path: Path) -> None:
    running = start_service(guarded, tmp_path, "--max-batch", "1", "--max-queue", "2", "--max-wait-ms", "0")
    try:
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=40)) as client:
                return await asyncio.gather(*(client.post(running.url + "/v1/classify", json={"texts": guarded.clean[:16]}) for _ in range(30)))

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 1, codes
        refused = next(r for r in responses if r.status_code == 503)
        assert int(refused.headers["retry-after"]) >= 1 and "overloaded" in refused.json()["error"]["message"]
        assert httpx.post(running.url + "/v1/classify", json={"texts": guarded.clean[:4]}).status_code == 200  # recovered at once
        shed = httpx.get(running.url + "/metrics").text
        assert metric(shed, 'peftshield_shed_total{reason="queue_full"}') == codes.count(503)
    finally:
        assert running.stop() == 0, running.output()
