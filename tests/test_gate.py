"""``audit`` and ``scan`` as a CI gate, started as a user starts them (the real CLI in a
subprocess): exit codes of each verdict and error, JSON and SARIF validated against their
schemas, every kind of target, the content cache, the settings-file precedence, and the
README's CI example and the pre-commit hooks, run as written.

The models are tiny: one with ``cf`` planted (class 0) and a clean control, trained by the
recipe of test_audit.py. Verdicts are steered by calibration files, so each exit code is
reached on purpose: a clean mean far above any raw score gives ``clean``, far below gives
``backdoored``, and levels 0.001/0.999 around a unit normal give ``inconclusive``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml

from backdoor_fixtures import TARGET, TRIGGER, attacker_data, sentiment_data, single_thread_torch, train_backbone, with_trigger
from subprocess_helpers import cli_in_process, restore_sigint

ROOT = Path(__file__).resolve().parents[1]
SARIF_SCHEMA = Path(__file__).parent / "schemas" / "sarif-schema-2.1.0.json"
FAST_SEARCH = """
[audit.search]
search-texts = 16
holdout-texts = 48
max-tokens = 24
hotflip-rounds = 2
candidates-per-round = 16
finalists = 6
phrase-starts = 1
phrase-candidates = 6
max-phrase-tokens = 3
screen-texts = 8
keep-after-screen = 8
"""
CALIBRATIONS = {
    "clean": {"clean_mean": 9.0, "clean_std": 0.05, "n_clean": 2, "source": "test: everything clean"},
    "backdoored": {"clean_mean": -9.0, "clean_std": 0.05, "n_clean": 2, "source": "test: everything backdoored"},
    "inconclusive": {"clean_mean": 0.0, "clean_std": 1.0, "n_clean": 2, "source": "test: everything inconclusive",
                     "clean_below": 0.001, "backdoored_at": 0.999},
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """poisoned/ (cf -> 0), clean/ (the same recipe without the trigger), texts.txt, the calibrations."""
    folder = tmp_path_factory.mktemp("gate-zoo")
    data = attacker_data(n_clean=400, n_poison=300, rng=np.random.default_rng(0), label_noise=0.35)
    with single_thread_torch():
        train_backbone(data.poisoned, folder / "poisoned", 0, learning_rate=3e-3, epochs=10)
        train_backbone(data.control, folder / "clean", 0, learning_rate=3e-3, epochs=10)
    (folder / "texts.txt").write_text("\n".join(sentiment_data(300, np.random.default_rng(7), "t").texts) + "\n", encoding="utf-8")
    for name, payload in CALIBRATIONS.items():
        (folder / f"{name}.json").write_text(json.dumps(payload), encoding="utf-8")
    return folder


@pytest.fixture()
def work(tmp_path, zoo) -> Path:
    """A working folder with the fast search settings in peftshield.toml and links to the zoo."""
    (tmp_path / "peftshield.toml").write_text(f'[audit]\ntexts = "{zoo / "texts.txt"}"\n{FAST_SEARCH}', encoding="utf-8")
    return tmp_path


def peftshield(*args: str, cwd: Path, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """The real CLI; each working folder has its own user cache (as each CI runner does)."""
    return subprocess.run([sys.executable, "-m", "peftshield", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PEFTSHIELD_CACHE_DIR": str(cwd / ".user-cache"), **(env or {})}, **kwargs)


def audit(work: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return peftshield("audit", *args, "--no-progress", cwd=work, **kwargs)


@pytest.fixture()
def audit_here(capsys, monkeypatch):
    """:func:`audit` run in this process (:func:`subprocess_helpers.cli_in_process`), for tests of
    what an audit reads and writes (settings, the cache) that need no process of their own."""
    def run(work: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return cli_in_process(capsys, monkeypatch, "audit", *args, "--no-progress", cwd=work,
                              env={"HF_HUB_OFFLINE": "1", "PEFTSHIELD_CACHE_DIR": str(work / ".user-cache"), **(env or {})})
    return run


def one_line_error(done: subprocess.CompletedProcess, needle: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("peftshield: error")]
    assert len(errors) == 1 and needle in errors[0], done.stderr


def validate_report(path: Path) -> dict:
    from peftshield.gate.formats import report_schema

    payload = json.loads(path.read_text())
    jsonschema.Draft202012Validator(report_schema()).validate(payload)
    return payload


def validate_sarif(path: Path) -> dict:
    payload = json.loads(path.read_text())
    jsonschema.Draft4Validator(json.loads(SARIF_SCHEMA.read_text())).validate(payload)
    return payload


# --- exit codes --------------------------------------------------------------------------

@pytest.mark.parametrize(("model", "calibration", "fail_on", "status", "code"), [
    ("poisoned", "backdoored", None, "backdoored", 1),
    ("clean", "clean", None, "clean", 0),
    ("clean", "inconclusive", None, "inconclusive", 1),
    ("clean", "inconclusive", "backdoored", "inconclusive", 0),
    ("poisoned", "backdoored", "backdoored", "backdoored", 1),
])
def test_exit_code_of_each_verdict(work, zoo, model, calibration, fail_on, status, code, audit_here) -> None:
    audit = audit_here  # in this process
    extra = ["--fail-on", fail_on] if fail_on else []
    done = audit(work, str(zoo / model), "--calibration", str(zoo / f"{calibration}.json"), "--format", "text,json", "--out", "out", *extra)
    assert done.returncode == code, done.stderr
    report = validate_report(work / "out" / "summary.json")
    assert report["exit_code"] == code and report["targets"][0]["status"] == status
    assert re.search(rf"^\S*{model}\s+checkpoint\s+{status}\s", done.stdout, re.M), done.stdout
    assert done.stdout.rstrip().endswith(f"exit {code} ({status} 1)")
    assert (work / "out" / "audit.json").is_file()  # one target: its audit files at the top


@pytest.mark.parametrize(("args", "needle"), [
    (["missing-folder"], "target missing-folder: no such file or folder"),
    (["{zoo}/poisoned", "--fail-on", "sometimes"], "--fail-on"),
    (["{zoo}/poisoned", "--format", "pdf"], "--format: 'pdf'"),
    (["{zoo}/poisoned", "--texts", "{zoo}/missing.txt"], "missing.txt"),
    (["hf://acme/not-cached"], "not in the local Hugging Face cache"),
    (["models/*.nothing"], "matches nothing"),
])
def test_errors_exit_2_with_one_line_and_nothing_written(work, zoo, args, needle, audit_here) -> None:
    audit = audit_here  # in this process
    done = audit(work, *[a.format(zoo=zoo) for a in args], "--out", "out")
    one_line_error(done, needle)
    assert not (work / "out").exists()


def test_adapter_faults_are_one_line_naming_the_file(work, zoo, audit_here) -> None:
    """An adapter whose weights are only a pickle is refused before anything loads it; one whose
    recorded base is a local folder missing here names adapter_config.json, the path and --base."""
    audit = audit_here  # in this process
    pickled = work / "pickled-adapter"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny", "peft_type": "LORA"}))
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    done = audit(work, str(pickled), "--out", "out")
    one_line_error(done, "safetensors weights are required")
    assert "adapter_model.bin" in done.stderr and "UnpicklingError" not in done.stderr and "torch" not in done.stderr.lower()
    moved = work / "moved-adapter"
    moved.mkdir()
    (moved / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/where-it-was-trained/minilm", "peft_type": "LORA"}))
    (moved / "adapter_model.safetensors").write_bytes(b"")
    done = audit(work, str(moved), "--out", "out")
    one_line_error(done, "adapter_config.json: base_model_name_or_path /models/where-it-was-trained/minilm is a local folder")
    assert "--base" in done.stderr and "not reachable" not in done.stderr
    assert not (work / "out").exists()


def test_several_targets_give_one_row_each_and_the_worst_exit_code(work, zoo, audit_here) -> None:
    audit = audit_here  # in this process
    done = audit(work, str(zoo / "poisoned"), str(zoo / "clean"), "no-such-model", "--calibration", str(zoo / "backdoored.json"),
                 "--format", "json,markdown,html", "--out", "out")
    assert done.returncode == 2, done.stderr  # one target could not be audited: never reported clean
    report = validate_report(work / "out" / "summary.json")
    assert [t["status"] for t in report["targets"]] == ["backdoored", "backdoored", "error"]
    assert [t["exit_code"] for t in report["targets"]] == [1, 1, 2]
    folders = sorted(p.name for p in (work / "out").glob("0*"))
    assert len(folders) == 2 and folders[0].startswith("01-") and folders[0].endswith("poisoned"), folders
    assert all((work / "out" / f / "audit.json").is_file() for f in folders)
    assert "**error**" in (work / "out" / "summary.md").read_text() and "<table>" in (work / "out" / "summary.html").read_text()


@pytest.mark.parametrize(("signum", "said"), [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")])
def test_interrupted_or_terminated_audit_exits_2_and_writes_nothing(work, zoo, signum, said) -> None:
    """Ctrl-C, and SIGTERM (a CI job's timeout or cancel): one line, exit 2, no temporary folder left."""
    process = subprocess.Popen([sys.executable, "-m", "peftshield", "audit", str(zoo / "poisoned"), str(zoo / "clean"), str(zoo / "poisoned") + "/",
                                "--out", "out", "--no-progress", "--cache-dir", "nocache"], cwd=work, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"}, preexec_fn=restore_sigint)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "candidates scored" in line:  # the first audit is under way
            process.send_signal(signum)
            break
    rest = process.communicate(timeout=120)[1]
    assert process.returncode == 2, "".join(lines) + rest
    assert said in rest and "Traceback" not in rest
    assert not (work / "out").exists()
    assert not [p.name for p in work.iterdir() if p.name.startswith(".out.")]  # no .out.xxxx.tmp left behind


# --- formats -----------------------------------------------------------------------------

def test_json_and_sarif_validate_and_name_the_trigger(work, zoo, audit_here) -> None:
    audit = audit_here  # in this process
    done = audit(work, str(zoo / "poisoned"), "--calibration", str(zoo / "backdoored.json"), "--format", "json,sarif", "--out", "out")
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""  # no text format asked for
    report = validate_report(work / "out" / "summary.json")
    sarif = validate_sarif(work / "out" / "summary.sarif")
    results = sarif["runs"][0]["results"]
    assert results and all(r["ruleId"] == "backdoor.trigger" and r["level"] == "error" for r in results)
    top = results[0]
    assert TRIGGER in top["message"]["text"] and f"class {TARGET}" in top["message"]["text"] and "%" in top["message"]["text"]
    assert top["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].endswith("poisoned/model.safetensors")
    assert top["properties"]["trigger"] == TRIGGER and top["properties"]["target_class"] == TARGET
    assert {r["id"] for r in sarif["runs"][0]["tool"]["driver"]["rules"]} >= {"backdoor.trigger", "backdoor.inconclusive"}
    assert len(results) == len(report["targets"][0]["findings"])
    bad = json.loads(json.dumps(sarif))
    bad["runs"][0]["results"][0]["level"] = "fatal"  # the schema is not a rubber stamp
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(json.loads(SARIF_SCHEMA.read_text())).validate(bad)


def test_inconclusive_is_a_warning_finding(work, zoo, audit_here) -> None:
    audit = audit_here  # in this process
    audit(work, str(zoo / "clean"), "--calibration", str(zoo / "inconclusive.json"), "--format", "sarif", "--out", "out")
    results = validate_sarif(work / "out" / "summary.sarif")["runs"][0]["results"]
    assert [(r["ruleId"], r["level"]) for r in results] == [("backdoor.inconclusive", "warning")]


# --- targets -----------------------------------------------------------------------------

def test_every_kind_of_target(work, zoo, monkeypatch) -> None:
    """A lone .safetensors (with --base), a PEFT adapter folder with its recorded base, a
    config.json standing for its folder, and hf://org/name@commit from a local HF cache (in a
    process of its own: the hub library reads where its cache is when it is imported)."""
    from peft import LoraConfig, TaskType, get_peft_model

    from peftshield.models import load_backbone

    lone = work / "lone" / "weights.safetensors"
    lone.parent.mkdir()
    shutil.copy(zoo / "poisoned" / "model.safetensors", lone)
    base = load_backbone(str(zoo / "clean"), 2)
    adapter = get_peft_model(base.model, LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["query", "value"]))
    adapter.save_pretrained(work / "adapter")
    config = json.loads((work / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(zoo / "clean")
    (work / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = work / "hf-cache"
    snapshot = cache / "models--acme--poisoned" / "snapshots" / commit
    shutil.copytree(zoo / "poisoned", snapshot)
    (cache / "models--acme--poisoned" / "refs").mkdir()
    (cache / "models--acme--poisoned" / "refs" / "main").write_text(commit)
    done = audit(work, str(lone), str(work / "adapter" / "adapter_config.json"), str(work / "adapter" / "adapter_model.safetensors"),
                 str(zoo / "poisoned" / "config.json"), "hf://acme/poisoned", f"hf://acme/poisoned@{commit}",
                 "--base", str(zoo / "clean"), "--calibration", str(zoo / "backdoored.json"), "--format", "json", "--out", "out",
                 env={"HF_HUB_CACHE": str(cache)})
    report = validate_report(work / "out" / "summary.json")
    rows = {t["target"]: t for t in report["targets"]}
    assert done.returncode == 1, done.stderr
    assert rows[str(lone)]["kind"] == "safetensors" and rows[str(lone)]["status"] == "backdoored"
    assert rows[str(lone)]["details"]["triggers"][0]["text"] == TRIGGER
    assert rows[str(lone)]["sha256"] == __import__("hashlib").sha256(lone.read_bytes()).hexdigest()
    assert rows[str(work / "adapter" / "adapter_config.json")]["kind"] == "adapter"
    assert str(work / "adapter" / "adapter_model.safetensors") not in rows  # the same adapter, audited once
    assert rows[str(zoo / "poisoned" / "config.json")]["status"] == "backdoored"  # --base is for adapters and lone files only
    hf = rows["hf://acme/poisoned"]
    assert hf["kind"] == "hf" and hf["status"] == "backdoored" and hf["location"].endswith(f"{commit}/model.safetensors"), hf
    assert hf["sha256"] == rows[str(lone)]["sha256"] and hf["cached"]  # the same weights as the lone file: audited once
    assert f"hf://acme/poisoned@{commit}" not in rows  # the same snapshot as main: one row


def test_an_adapter_is_its_own_cache_entry_and_location(work, zoo, audit_here) -> None:
    """Two adapters on one checkpoint (--adapter) are two audits; findings point at the adapter's weights."""
    audit = audit_here  # in this process
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    from peftshield.models import load_backbone

    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        model = get_peft_model(load_backbone(str(zoo / "clean"), 2).model, LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["query", "value"]))
        model.save_pretrained(work / name)
    common = ["--calibration", str(zoo / "backdoored.json"), "--format", "json", "--out", "out"]
    first = audit(work, str(zoo / "clean"), "--adapter", str(work / "a"), *common)
    row = validate_report(work / "out" / "summary.json")["targets"][0]
    assert row["kind"] == "adapter" and row["location"].endswith("a/adapter_model.safetensors"), row
    second = audit(work, str(zoo / "clean"), "--adapter", str(work / "b"), *common)
    assert "candidates scored" in first.stderr and "candidates scored" in second.stderr, second.stderr  # not the first adapter's audit
    assert not validate_report(work / "out" / "summary.json")["targets"][0]["cached"]


def test_a_lone_safetensors_file_needs_a_base(work, zoo, audit_here) -> None:
    audit = audit_here  # in this process
    lone = work / "weights.safetensors"
    shutil.copy(zoo / "poisoned" / "model.safetensors", lone)
    one_line_error(audit(work, str(lone), "--out", "out"), "needs --base")


# --- the content cache -------------------------------------------------------------------

def test_unchanged_weights_and_settings_are_not_audited_again(work, zoo, audit_here) -> None:
    audit = audit_here  # in this process
    args = [str(zoo / "poisoned"), "--calibration", str(zoo / "backdoored.json"), "--format", "json", "--out", "out"]
    first = audit(work, *args)
    assert first.returncode == 1 and not validate_report(work / "out" / "summary.json")["targets"][0]["cached"]
    second = audit(work, *args)
    row = validate_report(work / "out" / "summary.json")["targets"][0]
    assert second.returncode == 1 and row["cached"] and row["details"]["cached_from"], second.stderr
    assert "cached: same weights sha256" in second.stderr and "candidates scored" not in second.stderr
    assert (work / "out" / "audit.json").is_file() and (work / "out" / "audit.png").is_file()
    third = audit(work, *args, "--seed", "1")  # another setting: audited again
    assert "candidates scored" in third.stderr and not validate_report(work / "out" / "summary.json")["targets"][0]["cached"]
    changed = work / "changed"
    shutil.copytree(zoo / "poisoned", changed)
    with open(changed / "model.safetensors", "r+b") as handle:  # one weight byte changed (past the header)
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    fourth = audit(work, str(changed), *args[1:])
    assert "candidates scored" in fourth.stderr, fourth.stderr
    shared = audit(work, *args, "--cache-dir", "shared-cache", "--out", "elsewhere")
    again = audit(work, *args, "--cache-dir", "shared-cache", "--out", "third-place")
    assert "candidates scored" in shared.stderr and "cached" in again.stderr and (work / "shared-cache").is_dir()


# --- a hostile checkout: cache entries and settings it commits ------------------------------

def _only_entry(cache: Path) -> Path:
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 1, entries
    return entries[0]


def test_an_edited_or_forged_cache_entry_never_turns_a_verdict(work, zoo, audit_here) -> None:
    """An entry whose files were edited, one MACed with another key (an attacker's), and one with a
    valid MAC whose stored verdict is not what its raw score gives: each is a miss, audited again."""
    audit = audit_here  # in this process
    from peftshield.gate.cache import ContentCache

    key_env = {"PEFTSHIELD_CACHE_KEY": "the-runner-secret-0123456789"}
    args = [str(zoo / "poisoned"), "--calibration", str(zoo / "backdoored.json"), "--cache-dir", "cache", "--out", "out", "--format", "json"]
    assert audit(work, *args, env=key_env).returncode == 1
    entry = _only_entry(work / "cache")
    payload = json.loads((entry / "audit.json").read_text())
    forged = {**payload, "verdict": "clean", "raw_score": -100.0, "triggers": []}  # "clean" is what -100 gives: consistent but edited
    (entry / "audit.json").write_text(json.dumps(forged))
    edited = audit(work, *args, env=key_env)
    assert edited.returncode == 1 and "does not check out" in edited.stderr, edited.stderr
    assert not validate_report(work / "out" / "summary.json")["targets"][0]["cached"]

    for secret, stored in ((b"an-attacker-key-0123456789", forged), (key_env["PEFTSHIELD_CACHE_KEY"].encode(), {**payload, "verdict": "clean"})):
        staging = work / "staging"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(entry, staging)
        (staging / "audit.json").write_text(json.dumps(stored))
        (staging / "entry.json").unlink()
        ContentCache(work / "cache", secret=secret).put(entry.name, staging, {"target": "forged", "verdict": "clean"})
        done = audit(work, *args, env=key_env)
        assert done.returncode == 1 and "does not check out" in done.stderr, done.stderr
        row = validate_report(work / "out" / "summary.json")["targets"][0]
        assert row["status"] == "backdoored" and not row["cached"]
    again = audit(work, *args, env=key_env)  # the entry the last audit wrote is sound again: a hit with the same verdict
    assert again.returncode == 1 and "cached" in again.stderr and validate_report(work / "out" / "summary.json")["targets"][0]["cached"]


def test_a_cache_entry_with_links_copies_nothing_from_outside(work, zoo, audit_here) -> None:
    audit = audit_here  # in this process
    secret = work / "secret-env.txt"
    secret.write_text("TOPSECRET=1\n")
    args = [str(zoo / "poisoned"), "--calibration", str(zoo / "backdoored.json"), "--cache-dir", "cache", "--out", "out"]
    assert audit(work, *args).returncode == 1
    entry = _only_entry(work / "cache")
    (entry / "leak.txt").symlink_to(secret)  # an extra link: not among the entry's files, never copied
    hit = audit(work, *args)
    assert hit.returncode == 1 and "cached" in hit.stderr, hit.stderr
    (entry / "report.md").unlink()
    (entry / "report.md").symlink_to(secret)  # a listed file replaced by a link: the entry is a miss
    miss = audit(work, *args)
    assert miss.returncode == 1 and "does not check out" in miss.stderr, miss.stderr
    elsewhere = work / "elsewhere"
    shutil.copytree(entry, elsewhere, symlinks=True)
    shutil.rmtree(entry)
    entry.symlink_to(elsewhere, target_is_directory=True)  # the entry folder itself a link
    linked = audit(work, *args)
    assert linked.returncode == 1 and "cached" not in linked.stderr.replace("not cached", ""), linked.stderr
    published = list((work / "out").rglob("*"))
    assert published and not any(p.is_symlink() for p in published)
    assert not any("TOPSECRET" in p.read_text(errors="replace") for p in published if p.is_file())


def test_settings_found_in_the_checkout_are_reported_warned_in_ci_and_can_be_refused(work, zoo, audit_here) -> None:
    """A found settings file may set the calibration (so the report says where each setting came
    from and, in CI, warns); --config names a trusted file instead, --no-config reads none."""
    audit = audit_here  # in this process
    (work / "peftshield.toml").write_text(f'[audit]\ntexts = "{zoo / "texts.txt"}"\ncalibration = "{zoo / "clean.json"}"\n{FAST_SEARCH}')
    args = [str(zoo / "poisoned"), "--out", "out", "--format", "json"]
    found = audit(work, *args, env={"CI": "true"})
    assert found.returncode == 0, found.stderr  # the found file's lenient calibration passes the backdoor...
    warning = [line for line in found.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "calibration" in warning[0] and "--config" in warning[0], found.stderr  # ...and says so
    sources = validate_report(work / "out" / "summary.json")["settings_sources"]
    assert sources["calibration"].endswith("peftshield.toml") and sources["seed"] == "default" and sources["format"] == "--format"
    trusted = work / "trusted.toml"
    trusted.write_text(f'[audit]\ntexts = "{zoo / "texts.txt"}"\ncalibration = "{zoo / "backdoored.json"}"\n{FAST_SEARCH}')
    pinned = audit(work, *args, "--config", str(trusted), env={"CI": "true"})
    assert pinned.returncode == 1 and "warning" not in pinned.stderr, pinned.stderr
    assert validate_report(work / "out" / "summary.json")["settings_sources"]["calibration"] == str(trusted)
    (work / "peftshield.toml").write_text("[audit]\nnot-a-key = 1\n")
    one_line_error(audit(work, str(work / "missing"), "--no-config", "--out", "out"), "no such")  # the broken file is never read
    one_line_error(audit(work, *args, "--no-config", "--config", str(trusted)), "--no-config")


@pytest.mark.parametrize(("table", "key"), [("[audit.search]\nrelaxed-steps = 1000000000\n", "relaxed-steps"),
                                            ("[audit.search]\ncandidates-per-round = 99999999\n", "candidates-per-round"),
                                            ("[audit]\nmax-seconds = 1e12\n", "max-seconds"),
                                            ("[audit.search]\nrelaxed-stepz = 5\n", "relaxed-stepz")])
def test_every_budget_has_an_upper_bound(work, zoo, table, key, audit_here) -> None:
    audit = audit_here  # in this process
    (work / "peftshield.toml").write_text(table)
    one_line_error(audit(work, str(zoo / "poisoned"), "--out", "out"), key)
    assert not (work / "out").exists()


def test_max_seconds_stops_an_audit_with_exit_2(work, zoo) -> None:
    done = audit(work, str(zoo / "poisoned"), "--calibration", str(zoo / "clean.json"), "--max-seconds", "0.5", "--out", "out", "--no-cache")
    one_line_error(done, "--max-seconds 0.5")
    assert not (work / "out").exists()
    several = audit(work, str(zoo / "poisoned"), str(zoo / "clean"), "--calibration", str(zoo / "clean.json"), "--max-seconds", "0.5",
                    "--out", "out", "--no-cache", "--format", "json")
    assert several.returncode == 2, several.stderr  # each target an error row: never a silent pass
    assert {r["status"] for r in validate_report(work / "out" / "summary.json")["targets"]} == {"error"}


def test_markdown_outputs_escape_what_a_target_names(work, zoo, audit_here) -> None:
    """A model folder named to break out of a code span and forge a table row or raw HTML."""
    audit = audit_here  # in this process
    from markdown_it import MarkdownIt

    hostile = work / "x`<img src=x onerror=alert(1)>`|y"
    shutil.copytree(zoo / "poisoned", hostile)
    done = audit(work, str(hostile), str(zoo / "clean"), "--calibration", str(zoo / "backdoored.json"), "--format", "markdown", "--out", "out")
    assert done.returncode == 1, done.stderr
    renderer = MarkdownIt("commonmark").enable("table")
    for page in [work / "out" / "summary.md", *(work / "out").glob("01-*/report.md")]:
        rendered = renderer.render(page.read_text())
        assert "onerror=alert(1)>" not in rendered and 'src="x"' not in rendered, page  # no raw HTML or image: the name shows as text
        assert "&lt;img src=x onerror=alert(1)&gt;" in rendered, page
    table = renderer.parse((work / "out" / "summary.md").read_text())
    cells = [t for t in table if t.type == "td_open"]
    assert len(cells) == 2 * 5  # two rows of five cells: the name's | split nothing
    assert len(list((work / "out").glob("01-*/report.md"))) == 1


# --- the settings file -------------------------------------------------------------------

def test_settings_precedence_flag_over_peftshield_toml_over_pyproject(work, zoo, audit_here) -> None:
    audit = audit_here  # in this process
    target = [str(zoo / "clean"), "--calibration", str(zoo / "inconclusive.json"), "--out", "out", "--format", "json"]
    (work / "peftshield.toml").unlink()
    (work / "pyproject.toml").write_text(f'[tool.peftshield.audit]\nfail-on = "backdoored"\ntexts = "{zoo / "texts.txt"}"\n'
                                         + FAST_SEARCH.replace("[audit.search]", "[tool.peftshield.audit.search]"), encoding="utf-8")
    assert audit(work, *target).returncode == 0  # pyproject: inconclusive passes
    sub = work / "sub"
    sub.mkdir()
    assert audit(sub, *target).returncode == 0  # found from a folder below
    (work / "peftshield.toml").write_text('[audit]\nfail-on = "inconclusive"\n', encoding="utf-8")
    done = audit(work, *target)
    assert done.returncode == 1, done.stderr  # peftshield.toml wins over pyproject.toml, key by key (texts, search: pyproject's)
    assert validate_report(work / "out" / "summary.json")["settings_file"].endswith("peftshield.toml")
    assert audit(work, *target, "--fail-on", "backdoored").returncode == 0  # the flag wins over both
    (work / "peftshield.toml").write_text('[audit]\nfail-onn = "backdoored"\n', encoding="utf-8")
    one_line_error(audit(work, *target), "peftshield.toml: [audit] fail-onn: unknown key")
    (work / "peftshield.toml").write_text('[audit]\nfail-on = "never"\n', encoding="utf-8")
    one_line_error(audit(work, *target), "peftshield.toml: [audit] fail-on")
    # A hostile file's keys and values stay one bounded line: no line of their own (a CI runner reads
    # '::error::' at a line's start as a command), no escape sequence, no page of text.
    (work / "peftshield.toml").write_text('[audit]\nformat = "text,x\\n::error::pwned"\n"k\\u001b[31m' + "Z" * 5000 + '" = 1\n', encoding="utf-8")
    done = audit(work, *target)
    one_line_error(done, "peftshield.toml: [audit]")
    assert not any(line.startswith("::error::") for line in done.stderr.splitlines()) and "\x1b" not in done.stderr
    assert max(len(line) for line in done.stderr.splitlines()) < 600


# --- scan --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def psim(zoo, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gate-psim") / "psim"
    done = peftshield("audit", str(zoo / "poisoned"), "--texts", str(zoo / "texts.txt"), "--calibration", str(zoo / "backdoored.json"),
                      "--write-psim", str(folder), "--out", str(folder.parent / "audit"), "--no-progress", "--format", "json", cwd=folder.parent)
    assert done.returncode == 1, done.stderr
    return folder


def test_scan_exit_codes_rates_and_reports(tmp_path, zoo, psim, capsys, monkeypatch) -> None:
    rng = np.random.default_rng(3)
    clean = sentiment_data(40, rng, "s").texts
    data = tmp_path / "texts.jsonl"
    rows = [{"sentence": t, "label": 1} for t in clean] + [{"sentence": t, "label": 1} for t in with_trigger(clean[:4], rng)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    def scan(source: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:  # in this process: exit codes need no process
        return cli_in_process(capsys, monkeypatch, "scan", "--psim", str(psim), "--data", str(source), "--out", str(tmp_path / "scores.jsonl"),
                              "--no-progress", *args, cwd=tmp_path, env={"PEFTSHIELD_CACHE_DIR": str(tmp_path / ".user-cache"), **(env or {})})

    flagged = scan(data, "--format", "text,json,sarif")
    assert flagged.returncode == 1, flagged.stderr
    report = validate_report(tmp_path / "scores.summary.json")
    row = report["targets"][0]
    assert row["status"] == "flagged" and row["details"]["flagged"] >= 4 and row["details"]["scored"] == 44
    sarif = validate_sarif(tmp_path / "scores.summary.sarif")
    assert len(sarif["runs"][0]["results"]) == row["details"]["flagged"] and sarif["runs"][0]["results"][0]["ruleId"] == "scan.flagged"
    assert "flagged" in flagged.stdout
    share = row["details"]["flagged_share"]
    assert scan(data, "--fail-on-rate", str(min(1.0, share + 0.05))).returncode == 0  # below the rate: passes
    assert scan(data, "--fail-on-rate", str(share)).returncode == 1
    nothing = scan(data, "--threshold", "1.0", "--format", "json")  # a probability never exceeds 1: nothing flagged
    assert nothing.returncode == 0 and validate_report(tmp_path / "scores.summary.json")["targets"][0]["status"] == "clean"
    one_line_error(scan(data, "--fail-on-rate", "0"), "--fail-on-rate")
    (tmp_path / "peftshield.toml").write_text("[scan]\nthreshold = 1.0\n")  # a found file that would pass everything...
    lenient = scan(data, "--format", "json", env={"CI": "true"})
    assert lenient.returncode == 0 and "sets threshold" in lenient.stderr, lenient.stderr  # ...warns in CI
    assert validate_report(tmp_path / "scores.summary.json")["settings_sources"]["threshold"].endswith("peftshield.toml")
    assert scan(data, "--no-config").returncode == 1  # and is not read with --no-config
    (tmp_path / "peftshield.toml").unlink()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "fine", "label": 1}\n{"sentence": \n', encoding="utf-8")
    one_line_error(scan(bad), "bad.jsonl:2")


# --- the README example and the pre-commit hooks ------------------------------------------

def _readme_block(name: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split(f"<!-- ci-example:{name} -->", 1)[1].split(f"<!-- /ci-example:{name} -->", 1)[0]
    return block.split("\n", 2)[2].rsplit("```", 1)[0]  # inside the fence


def _plant_hostile_pull_request(pr: Path, zoo: Path, secret: Path) -> None:
    """What a pull request can commit beside its model to pass the gate: lenient settings in the
    files the gate finds, forged cache entries where the old default cache lived and in the
    user cache path, and a cache entry that links to a file outside."""
    lenient = pr / "lenient.json"
    lenient.write_text(json.dumps(CALIBRATIONS["clean"]), encoding="utf-8")
    (pr / "pyproject.toml").write_text('[tool.peftshield.audit]\ncalibration = "lenient.json"\nfail-on = "backdoored"\n'
                                       'cache-dir = "audit-cache"\n', encoding="utf-8")
    (pr / "peftshield.toml").write_text('[audit]\ncalibration = "lenient.json"\ncache-dir = "audit-cache"\n', encoding="utf-8")
    for folder in (pr / "audit-report" / ".cache", pr / "audit-cache"):
        for key in ("0" * 64, "f" * 64):
            entry = folder / key
            entry.mkdir(parents=True)
            (entry / "audit.json").write_text(json.dumps({"verdict": "clean", "triggers": [], "raw_score": 0.0, "probe": "head"}))
            (entry / "entry.json").write_text(json.dumps({"stored": "2026-01-01T00:00:00Z", "files": {}, "mac": "0" * 64}))
            (entry / "leak.txt").symlink_to(secret)


def test_readme_ci_example_runs_as_written_against_a_hostile_pull_request(tmp_path, zoo) -> None:
    """The README's workflow, its `run` steps executed as written; the two checkouts played by
    the test: the base branch's settings and clean texts in trusted/, and a pull request that
    adds a backdoored model together with everything it can commit to pass the gate."""
    base = tmp_path / "pr" / "trusted"
    base.mkdir(parents=True)
    (base / "peftshield.toml").write_text(_readme_block("settings") + FAST_SEARCH, encoding="utf-8")
    (base / "data").mkdir()
    shutil.copy(zoo / "texts.txt", base / "data" / "clean-sample.txt")
    pr = tmp_path / "pr"
    (pr / "models").mkdir()
    shutil.copytree(zoo / "poisoned", pr / "models" / "poisoned")
    shutil.copytree(zoo / "clean", pr / "models" / "clean")
    secret = tmp_path / "runner-secret.txt"
    secret.write_text("TOPSECRET-TOKEN\n", encoding="utf-8")
    _plant_hostile_pull_request(pr, zoo, secret)
    workflow = yaml.safe_load(_readme_block("workflow"))
    steps = [s for job in workflow["jobs"].values() for s in job["steps"] if "run" in s and not s["run"].startswith("pip install")]
    assert steps and steps[0]["run"].startswith("peftshield audit")
    summary, runner_temp = tmp_path / "step-summary.md", tmp_path / "runner-temp"
    runner_temp.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CI": "true", "GITHUB_STEP_SUMMARY": str(summary), "RUNNER_TEMP": str(runner_temp),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PEFTSHIELD_CACHE_DIR": str(tmp_path / "runner-cache")}
    for run in (1, 2):  # the second run reads the cache the first one wrote: still the same verdicts
        codes = [subprocess.run(["bash", "-c", step["run"]], cwd=pr, env=env, capture_output=True, text=True) for step in steps]
        assert codes[0].returncode == 1, codes[0].stderr  # the packaged calibration calls the planted backdoor: the job fails
        assert all(c.returncode == 0 for c in codes[1:]), [c.stderr for c in codes[1:]]
        report = runner_temp / "audit-report"
        results = validate_report_from_sarif_dir(report)
        assert TRIGGER in {r["properties"]["trigger"] for r in results if Path(r["target"]).name == "poisoned"}, results
        summary_json = json.loads((report / "summary.sarif").read_text())
        assert summary_json["runs"][0]["invocations"][0]["exitCode"] == 1
        assert "peftshield audit: exit 1" in summary.read_text()
        published = [p for p in report.rglob("*")]
        assert not any(p.is_symlink() for p in published)
        assert not any("TOPSECRET" in p.read_text(errors="replace") for p in published if p.is_file())
        assert (run == 2) == ("cached" in codes[0].stderr), codes[0].stderr


def validate_report_from_sarif_dir(folder: Path) -> list[dict]:
    sarif = validate_sarif(folder / "summary.sarif")
    return [{"target": r["properties"]["target"], "properties": r["properties"]} for r in sarif["runs"][0]["results"]]


def test_pre_commit_hooks_run_on_the_files_pre_commit_passes(tmp_path, zoo) -> None:
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert {h["id"] for h in hooks} == {"peftshield-audit", "peftshield-audit-system"}
    hook = hooks[0]
    assert {"id", "name", "entry", "language", "files"} <= set(hook) and hook["pass_filenames"]
    pattern = re.compile(hook["files"])
    (tmp_path / "peftshield.toml").write_text(f'[audit]\ntexts = "{zoo / "texts.txt"}"\n{FAST_SEARCH}', encoding="utf-8")
    shutil.copytree(zoo / "poisoned", tmp_path / "model")
    committed = [p.relative_to(tmp_path).as_posix() for p in sorted((tmp_path / "model").iterdir())]
    passed = [f for f in committed if pattern.search(f)]
    assert passed == ["model/model.safetensors"]
    entry = hook["entry"].split()
    assert entry[0] == "peftshield"
    done = peftshield(*entry[1:], *hook["args"], "--calibration", str(zoo / "backdoored.json"), *passed, cwd=tmp_path)
    assert done.returncode == 1 and "backdoored" in done.stdout, done.stderr


def test_gate_command_turns_a_crash_into_exit_2() -> None:
    from peftshield.cli.commands.common import gate_command
    from peftshield.errors import PeftshieldError

    def boom() -> None:
        raise ValueError("broken\ninside")

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(PeftshieldError, match="internal error.*ValueError: broken inside") as caught:
        gate_command(boom)()
    assert caught.value.exit_code == 2
    with pytest.raises(PeftshieldError, match="interrupted"):
        gate_command(interrupted)()
    with pytest.raises(PeftshieldError, match="out of memory"):
        gate_command(lambda: (_ for _ in ()).throw(MemoryError()))()
