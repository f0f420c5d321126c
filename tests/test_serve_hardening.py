"""``peftshield serve`` and ``peftshield guard`` against hostile input and hostile clients: texts
that cannot be encoded, deeply nested JSON, slowloris connections, a busy port, an API key file
others can read, and what an unauthenticated caller learns.

Like tests/test_serve.py (whose tiny guarded model and helpers this module reuses), the service
is tested as a service: the real ``peftshield serve`` process on a free loopback port, spoken to
over HTTP (or raw sockets), and stopped."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import select
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from peftshield.guard.batcher import MicroBatcher
from test_serve import AUTH, Guarded, Service, _one_thread, guarded, start_service  # noqa: F401 - fixtures used by name

HEADER_TIMEOUT_S = 2.0
KEEP_ALIVE_S = 2.0
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def hardened(guarded: Guarded, tmp_path_factory):
    """A service with an API key file others can read, short connection timeouts, and a 300 ms
    batching window (so concurrent requests share a forward pass)."""
    folder = tmp_path_factory.mktemp("hardened")
    keys = folder / "keys.txt"
    keys.write_text("key-one\n")
    keys.chmod(0o644)
    running = start_service(guarded, folder, "--api-key-file", str(keys), "--max-wait-ms", "300", "--max-batch", "64",
                            "--header-timeout-s", str(HEADER_TIMEOUT_S), "--keep-alive-timeout-s", str(KEEP_ALIVE_S), "--max-connections", "200")
    running.keys = keys
    yield running
    assert running.stop() == 0, running.output()


def address(service: Service) -> tuple[str, int]:
    host, port = service.url.removeprefix("http://").split(":")
    return host, int(port)


# ---------------------------------------------------------------- 3. one text cannot fail other clients' requests


def test_an_unencodable_text_is_a_422_for_its_own_request_and_its_batch_mates_get_200(hardened: Service, guarded: Guarded) -> None:
    url = hardened.url + "/v1/classify"
    # a lone surrogate, as a JSON escape in the raw body (JSON can say it; UTF-8 cannot encode it)
    poisoned = b'{"texts": ["fine", "\\ud800 and more"]}'

    async def one_round() -> tuple[httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(timeout=60) as client:
            good = [client.post(url, json={"texts": [guarded.clean[i]]}, headers=AUTH) for i in range(12)]
            bad = client.post(url, content=poisoned, headers={**AUTH, "Content-Type": "application/json"})
            answers = await asyncio.gather(*good[:6], bad, *good[6:])
            return answers[6], answers[:6] + answers[7:]

    for round_number in range(3):
        bad, good = asyncio.run(one_round())
        assert [r.status_code for r in good] == [200] * 12, (round_number, [r.text for r in good if r.status_code != 200][:2])
        assert bad.status_code == 422, bad.text
        assert bad.json()["error"]["status"] == 422 and "texts.1" in bad.json()["error"]["message"]
    log = hardened.output()
    assert "TypeError" not in log and "Traceback" not in log and "internal error" not in log


def test_a_failing_batch_is_bisected_so_only_the_offending_request_fails() -> None:
    calls: list[list[str]] = []

    def classify(texts: list[str]) -> list[str]:
        calls.append(list(texts))
        if "poison" in texts:
            raise TypeError("cannot tokenise the poison")
        return [t.upper() for t in texts]

    async def scenario() -> None:
        batcher = MicroBatcher(classify, max_batch=64, max_wait_ms=200)
        await batcher.start()
        submitted = [batcher.submit([f"a{i}", f"b{i}"]) for i in range(12)]
        submitted.insert(5, batcher.submit(["ok", "poison"]))
        answers = await asyncio.gather(*submitted, return_exceptions=True)
        assert isinstance(answers[5], TypeError), answers[5]
        good = answers[:5] + answers[6:]
        assert good == [[f"A{i}", f"B{i}"] for i in range(12)], good
        assert len(calls[0]) == 26, "the 13 requests first ran as one forward pass"
        # the halves that fail are split again: a few passes, not one per request of the batch
        assert len(calls) <= 1 + 2 * math.ceil(math.log2(13)), len(calls)
        assert sum("poison" in c for c in calls) == 1 + math.ceil(math.log2(13)), calls
        # a failing one-request batch still fails only itself, and the worker goes on
        with pytest.raises(TypeError):
            await batcher.submit(["poison"])
        assert await batcher.submit(["after"]) == ["AFTER"]
        await batcher.stop()

    asyncio.run(scenario())


# ---------------------------------------------------------------- 5. the guard filter: a bad row is one line naming it


@pytest.mark.parametrize("content, line, via", [
    (b'{"text": "fine"}\n{"id": 7, "text": "caf\xe9 au lait"}\n', 2, "file"),  # Latin-1, not UTF-8
    (b'"fine"\n\n{"text": "a lone \\udc00 surrogate"}\n', 3, "file"),  # valid JSON, not encodable
    (b'{"text": "fine"}\n{"text": "ok"}\n{"text": "\xff\xfe"}\n', 3, "stdin"),
], ids=["invalid-utf8-file", "lone-surrogate-file", "invalid-utf8-stdin"])
def test_guard_names_the_row_that_is_not_text(guarded: Guarded, tmp_path: Path, content: bytes, line: int, via: str) -> None:
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "peftshield", "guard", "--model", str(guarded.victim), "--psim", str(guarded.psim), "--out", str(out)]
    if via == "file":
        source = tmp_path / "in.jsonl"
        source.write_bytes(content)
        done = subprocess.run([*command, "--input", str(source)], capture_output=True, env=ENV, timeout=300)
        name = str(source)
    else:
        done = subprocess.run(command, input=content, capture_output=True, env=ENV, timeout=300)
        name = "<stdin>"
    stderr = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2, stderr
    assert stderr.strip().count("\n") == 0 and "Traceback" not in stderr, stderr
    assert stderr.startswith(f"peftshield: error: {name}: line {line}: "), stderr
    assert not out.exists() and not done.stdout


# ---------------------------------------------------------------- 6. deeply nested JSON


def test_deeply_nested_json_is_a_400_and_the_server_stays_healthy(hardened: Service, guarded: Guarded) -> None:
    url = hardened.url + "/v1/classify"
    for body in (b"[" * 100_000, b'{"texts": ' + b"[" * 100_000, b'{"texts": ["ok", ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"]}"):
        response = httpx.post(url, content=body, headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["status"] == 400 and "nested" in response.json()["error"]["message"]
    assert httpx.get(hardened.url + "/healthz").status_code == 200
    assert httpx.post(url, json={"texts": [guarded.clean[0]]}, headers=AUTH).status_code == 200
    assert "RecursionError" not in hardened.output() and "Traceback" not in hardened.output()


# ---------------------------------------------------------------- 8. slowloris, idle and kept-alive connections


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (end of file or reset); anything it sent first is read away."""
    try:
        while True:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            if not sock.recv(65536):
                return True
    except OSError:
        return True


def test_slowloris_does_not_stop_service_and_idle_or_partial_connections_are_closed(hardened: Service, guarded: Guarded) -> None:
    host, port = address(hardened)
    opened: list[socket.socket] = []
    try:
        started = time.monotonic()
        partial = []
        for _ in range(60):  # a request line and one header, then a header line now and then, never the blank line
            sock = socket.create_connection((host, port), timeout=5)
            sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: guard\r\n")
            partial.append(sock)
        idle = [socket.create_connection((host, port), timeout=5) for _ in range(20)]  # connect, send nothing
        kept = socket.create_connection((host, port), timeout=5)  # one request answered, then silence
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: guard\r\n\r\n")
        assert kept.recv(4096).startswith(b"HTTP/1.1 200"), "the kept-alive connection is answered"
        opened += partial + idle + [kept]
        # while the slow clients hold their connections, a normal client is served
        answer = httpx.post(hardened.url + "/v1/classify", json={"texts": [guarded.clean[0]]}, headers=AUTH, timeout=10)
        assert answer.status_code == 200 and time.monotonic() - started < HEADER_TIMEOUT_S, "served while the slowloris connections are open"
        closed_at: dict[int, float] = {}
        deadline = started + HEADER_TIMEOUT_S + 4
        while len(closed_at) < len(opened) and time.monotonic() < deadline:
            for index, sock in enumerate(opened):
                if index in closed_at:
                    continue
                if _closed(sock):
                    closed_at[index] = time.monotonic() - started
                elif sock in partial:
                    try:
                        sock.sendall(b"X-Slow: 1\r\n")  # the header grows, slowly: that must not keep the connection
                    except OSError:
                        closed_at[index] = time.monotonic() - started
            time.sleep(0.25)
        still_open = [i for i in range(len(opened)) if i not in closed_at]
        assert not still_open, f"{len(still_open)} of {len(opened)} connections still open {deadline - started:.0f} s on (timeouts {HEADER_TIMEOUT_S} s)"
        assert min(closed_at.values()) >= 1.0, "nothing is closed long before its timeout"
        # and the service answers as before
        assert httpx.post(hardened.url + "/v1/classify", json={"texts": [guarded.clean[1]]}, headers=AUTH, timeout=10).status_code == 200
    finally:
        for sock in opened:
            sock.close()


# ---------------------------------------------------------------- 9. a busy port


def test_serve_on_a_busy_port_is_one_line_before_the_models_load(guarded: Guarded) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "peftshield", "serve", "--model", str(guarded.victim), "--psim", str(guarded.psim),
                               "--port", str(port)], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stderr.strip().count("\n") == 0 and "--port" in done.stderr and str(port) in done.stderr, done.stderr
    assert not done.stdout and "ready:" not in done.stderr and "serving" not in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------- 15. an API key file others can read


def test_an_api_key_file_others_can_read_is_a_warning(hardened: Service, tmp_path: Path) -> None:
    from peftshield.guard.keys import api_key_file_warning

    assert stat.S_IMODE(hardened.keys.stat().st_mode) & 0o044
    warnings = [json.loads(line) for line in hardened.output().splitlines() if line.startswith("{") and "--api-key-file" in line]
    assert len(warnings) == 1, hardened.output()
    assert warnings[0]["level"] == "warning" and str(hardened.keys) in warnings[0]["message"]
    assert "readable by others" in warnings[0]["message"] and "chmod 600" in warnings[0]["message"]
    private = tmp_path / "keys.txt"  # the owner's alone: no warning
    private.write_text("key-one\n")
    private.chmod(0o600)
    assert api_key_file_warning(private) is None


# ---------------------------------------------------------------- what an unauthenticated caller learns


def test_unauthenticated_probes_and_metrics_show_no_paths_or_texts(hardened: Service, guarded: Guarded) -> None:
    ready = httpx.get(hardened.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    secrets = [str(guarded.victim), str(guarded.psim), str(guarded.victim.parent), str(hardened.keys)]
    assert not any(secret in ready.text for secret in secrets), ready.text
    assert not re.search(r'"/[^"]*"', ready.text.replace('"/readyz"', "")), f"a filesystem path in /readyz: {ready.text}"
    marker = "zebra-crossing-marker-text"
    assert httpx.post(hardened.url + "/v1/classify", json={"texts": [marker]}, headers=AUTH).status_code == 200
    assert httpx.get(hardened.url + "/home/someone/secret-probe").status_code == 404
    metrics = httpx.get(hardened.url + "/metrics")
    assert metrics.status_code == 200
    assert not any(secret in metrics.text for secret in secrets) and marker not in metrics.text and "secret-probe" not in metrics.text
    # the operator finds the paths in the startup log
    assert str(guarded.victim) in hardened.output() and str(guarded.psim) in hardened.output()
