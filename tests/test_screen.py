"""``peftshield screen`` (issue 27), stage 1 and the command, on synthetic LoRA adapters of the
tiny BERT: weight-space features, the fleet's unsupervised outlier score, damaged adapters as
error rows, and stage 2's audit on the chosen ones. Whether stage 1 finds *backdoored* adapters
is a question for a labelled zoo (bench/screen.md), not for these synthetic weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from peftshield.screen import FleetScreen, adapter_features, select_for_audit
from peftshield.screen.fleet import parse_budget
from peftshield.screen.run import stage1
from peftshield.screen.weights import delta_singular_values

HIDDEN, LAYERS = 32, 2


def write_adapter(folder: Path, rng: np.random.Generator, rank: int = 4, boost: float = 0.0, base: str = "tiny") -> Path:
    """A PEFT LoRA adapter folder for the tiny BERT (query and value of each layer, and the head).
    ``boost`` adds a rank-1 change of that size to layer 1's value: an adapter unlike its peers."""
    folder.mkdir(parents=True)
    tensors = {}
    for layer in range(LAYERS):
        for module in ("query", "value"):
            prefix = f"base_model.model.bert.encoder.layer.{layer}.attention.self.{module}"
            a = rng.normal(0, 0.1, (rank, HIDDEN)).astype(np.float32)
            b = rng.normal(0, 0.02, (HIDDEN, rank)).astype(np.float32)
            if boost and layer == 1 and module == "value":
                b[:, 0] += boost * rng.normal(0, 1, HIDDEN).astype(np.float32)
                a[0] *= 3
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
    tensors["base_model.model.classifier.weight"] = rng.normal(0, 0.1, (2, HIDDEN)).astype(np.float32)
    tensors["base_model.model.classifier.bias"] = rng.normal(0, 0.01, 2).astype(np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base, "r": rank, "lora_alpha": 2 * rank,
                                                            "target_modules": ["query", "value"], "task_type": "SEQ_CLS",
                                                            "modules_to_save": ["classifier"]}))
    return folder


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> list[Path]:
    """Twelve ordinary adapters and one unlike them (the last)."""
    root = tmp_path_factory.mktemp("fleet")
    rng = np.random.default_rng(0)
    return [write_adapter(root / f"a{i:02d}", rng) for i in range(12)] + [write_adapter(root / "odd", rng, boost=0.5)]


def test_the_spectrum_of_the_weight_change_is_computed_without_forming_it() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 300)), rng.normal(size=(200, 4))
    np.testing.assert_allclose(delta_singular_values(a, b, 2.0), np.linalg.svd(2.0 * b @ a, compute_uv=False)[:4], rtol=1e-9)


def test_features_read_peft_and_peftshield_folders_alike(fleet: list[Path], tmp_path: Path) -> None:
    features = adapter_features(fleet[0])
    assert features.modules == 4 and len(features.names) == len(features.values) and np.all(np.isfinite(features.values))
    assert {"1.value.log_norm", "all.top_share.max", "head.row_norm_ratio"} <= set(features.names)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "trainable.safetensors").write_bytes((fleet[0] / "adapter_model.safetensors").read_bytes())
    (ours / "finetune.json").write_text(json.dumps({"method": "lora", "backbone": "tiny", "num_labels": 2, "options": {"r": 4, "alpha": 8}}))
    again = adapter_features(ours)
    assert again.names == features.names and np.allclose(again.values, features.values) and again.cohort == features.cohort


def test_the_adapter_unlike_its_peers_ranks_first_and_a_lone_cohort_goes_to_the_audit(fleet: list[Path], tmp_path: Path) -> None:
    lone = write_adapter(tmp_path / "lone", np.random.default_rng(5), rank=16)  # the only rank-16 adapter: no peers
    rows = stage1([str(p) for p in [*fleet, lone]], FleetScreen(min_cohort=8))
    by_name = {Path(r.target).name: r for r in rows}
    assert by_name["lone"].status == "no-peers" and by_name["lone"].rank == 1
    assert by_name["odd"].rank == 2, sorted((r.rank, Path(r.target).name, r.score) for r in rows)
    assert by_name["odd"].score > 2 * max(r.score for n, r in by_name.items() if n not in ("odd", "lone"))


@pytest.mark.parametrize("damage", ["truncated", "no-rank", "link", "pickle-only", "not-json", "nan", "deep-json", "extra-tensor",
                                    "alpha-pattern", "wrong-rank"])
def test_a_damaged_adapter_is_an_error_row_never_clean(fleet: list[Path], tmp_path: Path, damage: str) -> None:
    bad = write_adapter(tmp_path / "bad", np.random.default_rng(9))
    weights, config = bad / "adapter_model.safetensors", bad / "adapter_config.json"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    elif damage == "no-rank":
        config.write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 8}))
    elif damage == "link":
        weights.unlink()
        weights.symlink_to(fleet[0] / "adapter_model.safetensors")
    elif damage == "pickle-only":
        weights.unlink()
        (bad / "adapter_model.bin").write_bytes(b"\x80\x04 not loaded")
    elif damage in ("nan", "extra-tensor", "wrong-rank"):
        from safetensors.numpy import load_file

        tensors = load_file(str(weights))
        if damage == "nan":
            tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"][0, 0] = np.nan
        elif damage == "extra-tensor":  # trained weights stage 1 does not model (PEFT would load them)
            tensors["base_model.model.aaa_classifier.weight"] = np.ones((2, HIDDEN), dtype=np.float32)
        else:
            tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"] = np.ones((6, HIDDEN), dtype=np.float32)
            tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"] = np.ones((HIDDEN, 6), dtype=np.float32)
        save_file(tensors, str(weights))
    elif damage == "deep-json":
        config.write_text("[" * 100_000 + "]" * 100_000)
    elif damage == "alpha-pattern":  # a per-module alpha changes the weight change stage 1 computes
        config.write_text(json.dumps({**json.loads(config.read_text()), "alpha_pattern": {"value": 64}}))
    else:
        config.write_text("{not json")
    from peftshield.screen.run import features_or_error

    message = features_or_error(str(bad))
    assert isinstance(message, str) and "\n" not in message and str(bad) in message, message
    rows = stage1([str(p) for p in fleet] + [str(bad)], FleetScreen(min_cohort=8))
    assert rows[-1].status == "error" and rows[-1].score is None and all(r.status == "scored" for r in rows[:-1])


def test_copies_of_one_adapter_do_not_vouch_for_it(fleet: list[Path], tmp_path: Path) -> None:
    """Eight copies of one adapter (or one adapter under eight spellings) are one peer, not a
    cohort: they score no-peers and go to the audit first."""
    import shutil

    from peftshield.screen.run import unique_targets

    copies = []
    for index in range(8):
        shutil.copytree(fleet[-1], tmp_path / f"copy{index}")
        copies.append(str(tmp_path / f"copy{index}"))
    rows = stage1(copies, FleetScreen(min_cohort=8))
    assert {r.status for r in rows} == {"no-peers"}
    spellings = [str(fleet[0]), str(fleet[0]) + "/", str(fleet[0].parent / "." / fleet[0].name), str(fleet[0].parent / ".." / fleet[0].parent.name / fleet[0].name)]
    assert unique_targets(spellings) == [str(fleet[0])]


def test_the_budget_takes_the_most_unusual_and_a_seeded_sample_of_the_rest() -> None:
    scores = np.array([0.5, 3.0, 1.0, np.inf, 0.7, 0.2, 0.9, 0.1])
    top, drawn = select_for_audit(scores, 2, 2, np.random.default_rng(0))
    assert top == [3, 1] and len(drawn) == 2 and not set(drawn) & set(top)
    assert select_for_audit(scores, 2, 2, np.random.default_rng(0))[1] == drawn
    assert parse_budget("10%", 205, "--audit-budget") == 21 and parse_budget("7", 5, "--audit-budget") == 5


def run_cli(*args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **({"PEFTSHIELD_CACHE_DIR": str(cache)} if cache else {})}
    return subprocess.run([sys.executable, "-m", "peftshield", "screen", *args], capture_output=True, text=True, env=env, timeout=600)


def test_screen_command_stage1_from_a_manifest_and_one_line_errors(fleet: list[Path], tmp_path: Path) -> None:
    manifest = tmp_path / "fleet.txt"
    manifest.write_text("# incoming adapters\n" + "".join(f"{p}\n" for p in fleet[:6]) + "\n")
    out = tmp_path / "out"
    done = run_cli(*[str(p) for p in fleet[6:]], "--manifest", str(manifest), "--stage1-only", "--out", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "screen.json").read_text())
    assert report["adapters"] == 13 and report["exit_code"] == 0 and {r["status"] for r in report["rows"]} == {"scored"}
    assert min(report["rows"], key=lambda r: r["rank"])["target"].endswith("odd") and "| 1 |" in (out / "screen.md").read_text()
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9/adapter\n")
    for args, message in ((["--manifest", str(tmp_path / "missing.txt")], "--manifest"), ([str(fleet[0]), "--audit-budget", "ten"], "--audit-budget"),
                          ([], "give adapter folders"), (["--manifest", str(tmp_path / "latin1.txt")], "line 1 is not UTF-8")):
        done = run_cli(*args, "--out", str(tmp_path / "never"))
        assert done.returncode == 2 and message in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr
    assert not (tmp_path / "never").exists()


def test_stage2_audits_the_most_unusual_and_a_sample_and_exits_as_audit_does(fleet: list[Path], tmp_path: Path) -> None:
    """The real audit on the chosen adapters: the budget (1, the odd one) and a sample of 1; a
    damaged adapter makes the run exit 2, and its row says why."""
    bad = write_adapter(tmp_path / "bad", np.random.default_rng(9))
    (bad / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    out = tmp_path / "out"
    done = run_cli(*[str(p) for p in fleet], str(bad), "--audit-budget", "1", "--audit-sample", "1", "--out", str(out), "--no-progress")
    report = json.loads((out / "screen.json").read_text())
    audited = {Path(r["target"]).name: r for r in report["rows"] if r["audited"]}
    assert set(r["audited"] for r in audited.values()) == {"top", "sample"} and audited["odd"]["audited"] == "top"
    assert all(r["verdict"] in ("clean", "backdoored", "inconclusive") for r in audited.values()), audited
    assert done.returncode == 2 == report["exit_code"], done.stderr
    assert report["estimate"]["sampled"] == 1 and (out / "audits").is_dir()
    check_report_files(out, report)
    sarif_targets = {result["properties"]["target"] for result in json.loads((out / "screen.sarif").read_text())["runs"][0]["results"]}
    assert str(bad) in sarif_targets  # the unreadable adapter is a finding, never a silent pass


def check_report_files(out: Path, report: dict) -> None:
    """screen.json against its shipped schema; SARIF 2.1.0 with a result for each finding; the HTML
    page with its plots embedded as PNG data and no fleet text unescaped."""
    import html

    import jsonschema

    from peftshield.screen.formats import screen_schema

    jsonschema.Draft202012Validator(screen_schema()).validate(report)
    sarif = json.loads((out / "screen.sarif").read_text())
    jsonschema.Draft4Validator(json.loads((Path(__file__).parent / "schemas" / "sarif-schema-2.1.0.json").read_text())).validate(sarif)
    expected = sorted(r["target"] for r in report["rows"] if r["status"] == "error" or r["verdict"] in ("backdoored", "inconclusive", "error"))
    assert sorted(r["properties"]["target"] for r in sarif["runs"][0]["results"]) == expected
    assert sarif["runs"][0]["invocations"][0]["exitCode"] == report["exit_code"]
    page = (out / "screen.html").read_text()
    assert page.count("<img alt=") == (2 if any(r["audited"] for r in report["rows"]) else 1) and "src='data:image/png;base64," in page
    for row in report["rows"]:
        shown = html.escape(row["target"]).encode("utf-8", "backslashreplace").decode("utf-8")  # text UTF-8 cannot encode: escaped
        assert f"<code>{shown}</code>" in page
    assert "<script" not in page.lower()


def test_a_hostile_adapter_name_and_base_model_stay_text_in_every_report(fleet: list[Path], tmp_path: Path) -> None:
    odd = tmp_path / "<img src=x onerror=alert(1)>|`[x](https:%2f%2fevil)#"
    write_adapter(odd, np.random.default_rng(5), base="<script>alert(1)</script>")
    surrogate = write_adapter(tmp_path / os.fsdecode(b"caf\xe9-latin1"), np.random.default_rng(6))  # a folder name UTF-8 cannot encode
    out = tmp_path / "out"
    done = run_cli(*[str(p) for p in fleet], str(odd), str(surrogate), "--stage1-only", "--out", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "screen.json").read_text())
    page = (out / "screen.html").read_text()
    assert "<script>" not in page and "<img src=x" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    row = next(r for r in report["rows"] if r["base"].startswith("<script>"))
    assert row["status"] == "no-peers"  # its own cohort (another base model): audited first
    assert "caf\\udce9-latin1" in (out / "screen.md").read_text()  # written escaped, never a failed report
    check_report_files(out, report)


def test_stage1_on_a_local_ray_gives_what_one_process_gives(fleet: list[Path], tmp_path: Path) -> None:
    """``--executor ray``: Ray Data over the targets, features from an actor pool; the same rows
    and scores as in one process, an unreadable adapter still its own error row."""
    pytest.importorskip("ray")
    bad = write_adapter(tmp_path / "bad", np.random.default_rng(9))
    (bad / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    targets = [str(p) for p in fleet] + [str(bad)]
    reports = {}
    for executor in ("local", "ray"):
        extra = ["--executor", "ray", "--workers", "2"] if executor == "ray" else []
        done = run_cli(*targets, "--stage1-only", "--out", str(tmp_path / executor), "--no-progress", *extra)
        assert done.returncode == 2, done.stderr  # the unreadable adapter: incomplete
        reports[executor] = json.loads((tmp_path / executor / "screen.json").read_text())["rows"]
    assert [(r["target"], r["status"], r["rank"]) for r in reports["ray"]] == [(r["target"], r["status"], r["rank"]) for r in reports["local"]]
    assert np.allclose([r["score"] for r in reports["ray"] if r["score"] is not None], [r["score"] for r in reports["local"] if r["score"] is not None])
    assert "damaged" in reports["ray"][-1]["message"]


def test_stage2_on_a_local_ray_audits_each_chosen_adapter_as_a_task(fleet: list[Path], tmp_path: Path) -> None:
    """Stage 2 as Ray tasks: the chosen adapters get the verdicts the one-process audit gives, and
    their audits are in the report's folder; the report says where it ran."""
    pytest.importorskip("ray")
    bad = write_adapter(tmp_path / "bad", np.random.default_rng(9))
    (bad / "adapter_config.json").write_text("{")  # unreadable: an error row from stage 1, never audited
    args = [*[str(p) for p in fleet], str(bad), "--audit-budget", "2", "--audit-sample", "0", "--no-progress"]
    reports = {}
    for executor in ("local", "ray"):
        extra = ["--executor", "ray", "--workers", "2"] if executor == "ray" else []
        done = run_cli(*args, "--out", str(tmp_path / executor), *extra, cache=tmp_path / "audit-cache")
        assert done.returncode == 2, done.stderr
        reports[executor] = json.loads((tmp_path / executor / "screen.json").read_text())
    audited = {executor: sorted((r["target"], r["verdict"]) for r in report["rows"] if r["audited"]) for executor, report in reports.items()}
    assert audited["ray"] == audited["local"] and len(audited["ray"]) == 2, audited
    # The second run found the first's audits in the content cache: a re-screen (or one resumed
    # after Ctrl-C or a lost worker) audits only what changed or was not finished.
    assert all(r["cached"] for r in reports["ray"]["rows"] if r["audited"]) and not any(r["cached"] for r in reports["local"]["rows"])
    assert all(verdict in ("clean", "backdoored", "inconclusive") for _, verdict in audited["ray"])
    assert reports["ray"]["executor"]["name"] == "ray" and reports["ray"]["executor"]["nodes"] >= 1
    assert len([p for p in (tmp_path / "ray" / "audits").iterdir() if p.is_dir()]) == 2
    check_report_files(tmp_path / "ray", reports["ray"])


def test_copies_of_one_adapter_share_a_key_and_anything_else_does_not(fleet: list[Path], tmp_path: Path) -> None:
    import shutil

    from peftshield.screen.run import same_files_key

    copy = Path(shutil.copytree(fleet[0], tmp_path / "copy"))
    assert same_files_key(str(copy)) == same_files_key(str(fleet[0])) is not None
    edited = Path(shutil.copytree(fleet[0], tmp_path / "edited"))
    config = json.loads((edited / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 64}))  # same weights, another scale
    assert same_files_key(str(edited)) != same_files_key(str(fleet[0]))
    linked = Path(shutil.copytree(fleet[0], tmp_path / "linked"))
    (linked / "README.md").symlink_to(fleet[1] / "adapter_config.json")
    assert same_files_key(str(linked)) is None  # a link vouches for nothing: audited as itself
    assert same_files_key(str(tmp_path / "missing")) is None


def test_copies_chosen_on_ray_are_audited_once_and_share_the_verdict(fleet: list[Path], tmp_path: Path) -> None:
    """The odd adapter republished under another name: both are chosen (the same score), one Ray
    task audits them (side by side, both would have missed the content cache), and the copy's row
    names the adapter whose verdict it took."""
    pytest.importorskip("ray")
    import shutil

    copy = shutil.copytree(fleet[-1], tmp_path / "odd-copy")
    out = tmp_path / "out"
    done = run_cli(*[str(p) for p in fleet], str(copy), "--audit-budget", "2", "--audit-sample", "0", "--executor", "ray", "--workers", "2",
                   "--out", str(out), "--no-progress", cache=tmp_path / "audit-cache")
    report = json.loads((out / "screen.json").read_text())
    audited = {Path(r["target"]).name: r for r in report["rows"] if r["audited"]}
    assert set(audited) == {"odd", "odd-copy"}, done.stderr
    assert audited["odd"]["verdict"] == audited["odd-copy"]["verdict"] in ("clean", "backdoored", "inconclusive")
    assert [r["cached"] for r in audited.values()].count(True) == 1
    copied = next(r for r in audited.values() if r["cached"])
    assert "the same files as" in copied["message"] and "(audited once)" in copied["message"]
    assert len([p for p in (out / "audits").iterdir() if p.is_dir()]) == 1
    check_report_files(out, report)


def write_decoder_adapter(folder: Path, seed: int, task_type: str, boost: float = 0.0) -> Path:
    """A real PEFT LoRA adapter of the tiny Llama (q_proj and v_proj), saved by ``save_pretrained``:
    a sequence classifier (with its ``score`` head) or a causal LM (no head)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from peftshield.models import load_backbone

    torch.manual_seed(seed)
    model = load_backbone("tiny-llama", 2).model
    if task_type == "CAUSAL_LM":
        model = LlamaForCausalLM(model.config)
    peft_model = get_peft_model(model, LoraConfig(task_type=task_type, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # as if trained: PEFT starts B at zero
                parameter.normal_(0, 0.02)
                if boost and ".layers.1." in name and "v_proj" in name:
                    parameter[:, 0] += boost * torch.randn(parameter.shape[0])
    peft_model.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("task_type", ["SEQ_CLS", "CAUSAL_LM"])
def test_decoder_adapters_are_screened_in_their_own_cohort(task_type: str, fleet: list[Path], tmp_path: Path) -> None:
    decoders = [write_decoder_adapter(tmp_path / f"d{i}", i, task_type) for i in range(9)] + [write_decoder_adapter(tmp_path / "odd", 99, task_type, boost=0.5)]
    features = adapter_features(decoders[0])
    assert {"0.q_proj.log_norm", "1.v_proj.top_share"} <= set(features.names) and features.modules == 4
    assert ("head.row_norm_ratio" in features.names) == (task_type == "SEQ_CLS")  # the score head is saved with a classifier
    assert features.cohort != adapter_features(fleet[0]).cohort
    rows = stage1([str(p) for p in decoders + fleet], FleetScreen(min_cohort=8))
    assert {r.status for r in rows} == {"scored"}
    assert min(rows[:10], key=lambda r: r.rank).target.endswith("odd") and min(rows[10:], key=lambda r: r.rank).target.endswith("odd")


def test_stage2_audits_a_decoder_classifier_and_says_why_a_causal_lm_adapter_is_not(tmp_path: Path) -> None:
    classifier = write_decoder_adapter(tmp_path / "classifier", 1, "SEQ_CLS")
    causal = write_decoder_adapter(tmp_path / "causal", 2, "CAUSAL_LM")
    out = tmp_path / "out"
    done = run_cli(str(classifier), str(causal), "--audit-budget", "2", "--base", "tiny-llama", "--out", str(out), "--no-progress")
    rows = {Path(r["target"]).name: r for r in json.loads((out / "screen.json").read_text())["rows"]}
    assert rows["classifier"]["verdict"] in ("clean", "backdoored", "inconclusive"), rows["classifier"]
    assert rows["causal"]["verdict"] == "error" and "the audit judges classifiers" in rows["causal"]["message"], rows["causal"]
    assert done.returncode == 2, done.stderr  # an adapter the audit could not judge: incomplete, never clean


def test_an_audit_whose_ray_worker_dies_is_its_own_error_row(tmp_path: Path) -> None:
    """A worker that dies under one adapter's audit (out of memory, say: here it exits) costs that
    adapter an error row after its retry, never the other audits or the fleet's report."""
    pytest.importorskip("ray")
    import ray

    from peftshield.screen.distributed import NODE_KEY, ray_audits

    def audit(spec: str, settings, folder: str) -> dict:
        if spec == "dies":
            import os

            os._exit(1)
        return {"status": "clean", "message": spec, "cached": False, NODE_KEY: "n1"}

    try:
        verdicts = ray_audits(["a", "dies", "b"], None, tmp_path / "audits", workers=2, audit=audit)
    finally:
        ray.shutdown()
    assert [verdicts[s]["status"] for s in ("a", "dies", "b")] == ["clean", "error", "clean"]
    assert "worker" in verdicts["dies"]["message"] and verdicts["b"]["message"] == "b"
