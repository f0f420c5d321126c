"""Faults a user meets outside the happy path, through the real CLI.

Ctrl-C, output places that cannot be written (read-only or full file systems, a file in
the way, a folder where a file is wanted, a device, a disk that fills up during the write),
damaged model files, saved models whose backbone moved, YAML alias bombs, misspelt component
options and the permissions of written files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from peftshield.cli import main
from subprocess_helpers import restore_sigint

PEFTSHIELD = Path(sys.executable).with_name("peftshield")
ROWS = [
    ("good film , great story", 1), ("bad boring plot", 0), ("fun movie and good acting", 1),
    ("awful film , not good", 0), ("great fun", 1), ("boring and bad acting", 0),
    ("very good story", 1), ("not fun at all", 0),
]
FAST = ["--epochs", "1", "--batch-size", "8", "--max-length", "32", "--no-progress"]
EVALUATE = ["--trigger", "badnet", "--trigger-option", "words=mn", "--max-length", "32", "--no-progress"]


# --- helpers ---------------------------------------------------------------------------------

def write_dataset(folder: Path, train_repeat: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, repeat in (("train", train_repeat), ("dev", 1), ("test", 2)):
        with open(folder / f"{split}.json", "w", encoding="utf-8") as handle:
            for i, (text, label) in enumerate(ROWS * repeat):
                handle.write(json.dumps({"sentence": text, "label": label, "idx": i}) + "\n")
    return folder


def save_tiny_backbone(folder: Path, perturb: bool = False) -> Path:
    import torch

    from peftshield.models.backbone import save_backbone
    from peftshield.models.tiny import tiny_backbone

    backbone = tiny_backbone()
    if perturb:
        with torch.no_grad():
            next(backbone.model.parameters()).add_(0.5)
    return save_backbone(backbone, folder)


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("peftshield: warning:")]
    assert code == 2, err
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def special_file(folder: Path) -> Path:
    """A private copy of /dev/full (a character device), or a FIFO where device nodes cannot be
    made: a special file the test owns, so even a broken build cannot replace the real /dev/full."""
    node = folder / "full"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    except OSError:
        os.mkfifo(node)
    return node


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders of the atomic writes (and write probes) left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and (p.name.endswith(".tmp") or ".old-" in p.name))


@contextlib.contextmanager
def mounted_tmpfs(where: Path, *options: str):
    """A tmpfs at ``where`` (skips the test when this machine does not allow mounting)."""
    where.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=256k", *options)), "tmpfs", str(where)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(folder: Path) -> None:
    """Write into ``folder`` until its file system is full."""
    with contextlib.suppress(OSError):
        with open(folder / "filler", "wb", buffering=0) as handle:
            while True:
                handle.write(b"x" * 4096)


class StderrReader:
    """Collects a process's stderr in a thread so the test can wait for a line."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for chunk in iter(lambda: process.stderr.read1(4096) if hasattr(process.stderr, "read1") else process.stderr.read(1), b""):
            self.text += chunk.decode("utf-8", "replace")

    def join(self) -> str:
        self._thread.join(timeout=30)
        return self.text


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def env(**extra: str) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **extra}


def interrupt_and_collect(process: subprocess.Popen, reader: StderrReader) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"the process did not stop after Ctrl-C; stderr: {reader.join()[-2000:]}")
    return code, reader.join()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A local tiny backbone, a LoRA victim and a P-tuning PSIM on it, made with the CLI."""
    root = tmp_path_factory.mktemp("trained")
    data = write_dataset(root / "data")
    backbone = save_tiny_backbone(root / "bb")
    victim, psim = root / "victim", root / "psim"
    assert main(["finetune", "--backbone", str(backbone), "--data", str(data), "--out", str(victim), "--method", "lora", *FAST]) == 0
    assert main(["psim", "train", "--backbone", str(backbone), "--data", str(data), "--out", str(psim), "--epochs", "1",
                 "--max-train-samples", "16", "--max-length", "32", "--no-progress"]) == 0
    return {"root": root, "data": data, "backbone": backbone, "victim": victim, "psim": psim}


def copy_of(folder: Path, tmp_path: Path, name: str | None = None) -> Path:
    return Path(shutil.copytree(folder, tmp_path / (name or folder.name)))


# --- 1. Ctrl-C -------------------------------------------------------------------------------

GRID = """\
name: interrupted
backbone: tiny
seeds: [0]
max_length: 32
attack: {{data: {data}, samples: 320, poison_count: 40, target_label: 0, label_mode: clean, epochs: 400, max_words: 20}}
triggers:
  - {{name: badnet, options: {{words: mn}}}}
datasets:
  - {{name: tiny, path: {data}}}
methods: [lora]
victim: {{samples: 32, epochs: 1, test_samples: 16, probe_samples: 0}}
defenses: [psim]
"""


def test_ctrl_c_during_grid_run_exits_130_and_says_interrupted(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", train_repeat=40)
    config = tmp_path / "grid.yaml"
    config.write_text(GRID.format(data=data))
    run_dir = tmp_path / "run"
    process = subprocess.Popen([str(PEFTSHIELD), "run", str(config), "--out", str(run_dir), "--no-progress"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env(), cwd=tmp_path, preexec_fn=restore_sigint)
    reader = StderrReader(process)
    try:
        stages = run_dir / "stages"
        # the attacker's stage is being built (its temporary folder exists): training has started
        wait_for(lambda: stages.is_dir() and any(p.name.endswith(".tmp") for p in stages.iterdir()) or process.poll() is not None,
                 180, "the grid to start training")
        assert process.poll() is None, f"the grid ended before it could be interrupted: {reader.join()}"
        time.sleep(1.0)
        code, err = interrupt_and_collect(process, reader)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 130, f"exit code {code}; stderr: {err[-2000:]}"
    assert "peftshield: interrupted" in err
    assert "Traceback" not in err
    assert not leftovers(stages), "the interrupted stage left its temporary folder"


def test_ctrl_c_during_finetune_exits_130_and_writes_nothing(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", train_repeat=40)
    out = tmp_path / "victim"
    # FORCE_COLOR makes the progress bar draw into the pipe, so the test sees training start
    process = subprocess.Popen([str(PEFTSHIELD), "finetune", "--backbone", "tiny", "--data", str(data), "--out", str(out),
                                "--epochs", "500", "--batch-size", "8", "--max-length", "32"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env(FORCE_COLOR="1"), cwd=tmp_path, preexec_fn=restore_sigint)
    reader = StderrReader(process)
    try:
        wait_for(lambda: "epoch 1/500" in reader.text or process.poll() is not None, 180, "fine-tuning to start")
        assert process.poll() is None, f"finetune ended before it could be interrupted: {reader.join()}"
        code, err = interrupt_and_collect(process, reader)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 130, f"exit code {code}; stderr: {err[-2000:]}"
    assert "peftshield: interrupted" in err and "Traceback" not in err
    assert not out.exists() and not leftovers(tmp_path)


def test_ctrl_c_through_main_returns_130(capsys, tmp_path: Path, monkeypatch) -> None:
    """The same in-process: typer hands main() an exit code for the abort; it must not be dropped."""
    import peftshield.experiments.stages as stages

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "poison_dataset", interrupted)
    code, err = cli(capsys, "poison", "--data", write_dataset(tmp_path / "data"), "--out", tmp_path / "out")
    assert code == 130 and err.strip() == "peftshield: interrupted"
    assert not (tmp_path / "out").exists()


# --- 2. output places that cannot be written ----------------------------------------------------

def test_check_output_place_probes_before_any_work(tmp_path: Path) -> None:
    from peftshield.errors import OutputError, PeftshieldError
    from peftshield.io import check_output_place

    assert issubclass(OutputError, PeftshieldError) and OutputError.exit_code == 2
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder\n")
    for kind in ("file", "dir"):
        for target in (blocker / "out", blocker / "a" / "b" / "out"):
            with pytest.raises(OutputError, match=r"^--out .*notes.txt/.*: cannot write there \(.*notes.txt is a file, not a folder\)$"):
                check_output_place(target, kind)
    with pytest.raises(OutputError, match="it is a file, not a folder"):
        check_output_place(blocker, "dir")
    with pytest.raises(OutputError, match="it is a folder"):
        check_output_place(tmp_path, "file")
    device = special_file(tmp_path)
    kind_of = stat.S_IFMT(os.stat(device).st_mode)
    with pytest.raises(OutputError, match=rf"--out {device}: cannot write there \(it is a device or special file, not a regular file\)"):
        check_output_place(device, "file")
    assert stat.S_IFMT(os.stat(device).st_mode) == kind_of, "the special file must not be replaced"
    # a usable place: the parent folder is created, the probe removed, nothing else written
    target = tmp_path / "new" / "deeper" / "scores.jsonl"
    assert check_output_place(target, "file") == target
    assert target.parent.is_dir() and list(target.parent.iterdir()) == []
    assert check_output_place(tmp_path / "x" / "run", "dir", label="--run") == tmp_path / "x" / "run"
    assert not (tmp_path / "x" / "run").exists() and list((tmp_path / "x").iterdir()) == []


@pytest.mark.parametrize("command", ["finetune", "attack", "poison"])
def test_out_under_a_regular_file_is_refused_before_any_compute(capsys, tmp_path: Path, command: str) -> None:
    data = write_dataset(tmp_path / "data")
    (tmp_path / "taken").write_text("x\n")
    out = tmp_path / "taken" / "model"
    # a damaged backbone proves the order: the --out error comes before anything is loaded
    damaged = save_tiny_backbone(tmp_path / "bb")
    os.truncate(damaged / "model.safetensors", 100)
    extra = {"finetune": ["--backbone", str(damaged), *FAST], "attack": ["--backbone", str(damaged), "--count", "4", *FAST], "poison": []}[command]
    code, err = cli(capsys, command, "--data", data, "--out", out, *extra)
    assert_one_line_error(code, err, f"--out {out}: cannot write there", "taken is a file, not a folder")
    assert (tmp_path / "taken").read_text() == "x\n" and not leftovers(tmp_path)


def test_out_on_a_read_only_file_system(capsys, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data")
    with mounted_tmpfs(tmp_path / "ro", "ro") as ro:
        for command, extra in (("finetune", ["--backbone", "tiny", *FAST]), ("attack", ["--backbone", "tiny", "--count", "4", *FAST]), ("poison", [])):
            code, err = cli(capsys, command, "--data", data, "--out", ro / "out", *extra)
            assert_one_line_error(code, err, f"--out {ro / 'out'}: cannot write there (read-only file system)")


def test_out_on_a_full_file_system(capsys, tmp_path: Path) -> None:
    from peftshield.errors import OutputError
    from peftshield.io import atomic_directory, check_output_place

    data = write_dataset(tmp_path / "data")
    with mounted_tmpfs(tmp_path / "disk") as disk:
        # some room left: the probe passes, but a 1 MB weight file does not fit; nothing is left behind
        check_output_place(disk / "model", "dir")
        import torch
        from safetensors.torch import save_file

        with pytest.raises(OutputError, match=r"model: cannot write there \(no space left on device\)"):
            with atomic_directory(disk / "model") as tmp:
                save_file({"w": torch.zeros(256, 1024)}, str(tmp / "weights.safetensors"))
        assert sorted(p.name for p in disk.iterdir()) == []
        # full: every command fails before any compute, in one line
        fill(disk)
        for command, extra in (("finetune", ["--backbone", "tiny", *FAST]), ("poison", [])):
            code, err = cli(capsys, command, "--data", data, "--out", disk / "out", *extra)
            assert_one_line_error(code, err, f"--out {disk / 'out'}: cannot write there (no space left on device)")
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_writes_to_a_full_device_are_one_line_and_leave_nothing(tmp_path: Path, monkeypatch) -> None:
    """A real ENOSPC anywhere: the temporary file's descriptor is /dev/full."""
    if not (os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)):
        pytest.skip("no /dev/full here")
    import tempfile

    import peftshield.io as io
    from peftshield.errors import OutputError

    real_mkstemp = tempfile.mkstemp

    def mkstemp_on_dev_full(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(io.tempfile, "mkstemp", mkstemp_on_dev_full)
    target = tmp_path / "out" / "scores.jsonl"
    with pytest.raises(OutputError, match=r"scores.jsonl: cannot write there \(no space left on device\)$"):
        io.atomic_write_text(target, "x" * 100_000)
    assert not target.exists() and list(target.parent.iterdir()) == []
    # a manifest written inside an atomic folder: the error names the folder, not its temporary name
    with pytest.raises(OutputError, match=r"^\S*/saved: cannot write there \(no space left on device\)$"):
        with io.atomic_directory(tmp_path / "saved") as tmp:
            io.atomic_write_json(tmp / "finetune.json", {"method": "lora"})
    assert not (tmp_path / "saved").exists() and not leftovers(tmp_path)
    monkeypatch.undo()
    # inside an atomic folder: the half-written folder is removed, an existing one kept as it was
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("old\n")
    with pytest.raises(OutputError, match=r"model: cannot write there \(no space left on device\)$"):
        with io.atomic_directory(tmp_path / "model") as tmp:
            (tmp / "part.txt").write_text("half")
            with open("/dev/full", "w") as handle:
                handle.write("x" * 100_000)
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["keep.txt"] and not leftovers(tmp_path)


def fill_up_at(monkeypatch, temporary_prefix: str) -> list[str]:
    """From now on, the temporary file whose name starts with ``temporary_prefix`` (an atomic write's
    ``.NAME.``, not its ``.NAME.probe-``) is written to /dev/full: the place passed the probe, then the
    disk fills up. Returns the list of the temporary names handed out that way."""
    if not (os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)):
        pytest.skip("no /dev/full here")
    import tempfile

    import peftshield.io as io

    real_mkstemp, redirected = tempfile.mkstemp, []

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        if kwargs.get("prefix") != temporary_prefix:
            return fd, name
        os.close(fd)
        redirected.append(name)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(io.tempfile, "mkstemp", mkstemp)
    return redirected


def test_a_disk_that_fills_up_during_a_scan_is_one_line_and_leaves_nothing(capsys, tmp_path: Path, trained, monkeypatch) -> None:
    """``scan`` streams its scores: the disk fills after the probe passed and after texts were scored
    (300 rows, ~13 KB, overflow the stream's buffer, so the kernel's ENOSPC comes from a write in the
    middle of the stream, not at the end). Gate commands say so in one line with exit 2."""
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"{ROWS[i % len(ROWS)][0]} {i}"}) + "\n" for i in range(300)), encoding="utf-8")
    out = tmp_path / "out" / "scores.jsonl"
    redirected = fill_up_at(monkeypatch, ".scores.jsonl.")
    code, err = cli(capsys, "scan", "--psim", trained["psim"], "--data", texts, "--out", out, "--no-progress", "--format", "text,json")
    assert_one_line_error(code, err, f"{out}: cannot write there (no space left on device)")
    assert len(redirected) == 1, "the stream's temporary file was the one to hit the full disk"
    assert list(out.parent.iterdir()) == [], "no scores, no summary, no temporary file"


def test_a_disk_that_fills_up_while_a_folder_is_written_is_one_line_and_leaves_nothing(capsys, tmp_path: Path, monkeypatch) -> None:
    """``poison`` writes its folder file by file: the disk fills at the last one (``poison.json``),
    after the splits were written into the temporary folder. One line names the output folder (not
    its temporary name), exit 2, and neither the folder nor its temporary copy is left."""
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "out" / "poisoned"
    redirected = fill_up_at(monkeypatch, ".poison.json.")
    code, err = cli(capsys, "poison", "--data", data, "--out", out, "--count", "4")
    line = assert_one_line_error(code, err, f"{out}: cannot write there (no space left on device)")
    assert ".tmp" not in line
    assert len(redirected) == 1 and Path(redirected[0]).parent.parent == out.parent  # inside the temporary folder
    assert list(out.parent.iterdir()) == [], "no folder, no temporary folder"
    # the same command with room left writes the whole folder
    monkeypatch.undo()
    code, err = cli(capsys, "poison", "--data", data, "--out", out, "--count", "4")
    assert code == 0, err
    assert {"train.jsonl", "poison.json"} <= {p.name for p in out.iterdir()} and not leftovers(out.parent)


def test_out_that_is_a_folder_where_a_file_is_wanted(capsys, tmp_path: Path, trained) -> None:
    folder = tmp_path / "scores.jsonl"
    (folder / "inside").mkdir(parents=True)
    code, err = cli(capsys, "scan", "--psim", trained["psim"], "--data", trained["data"] / "test.json", "--out", folder, "--no-progress")
    assert_one_line_error(code, err, f"--out {folder}: cannot write there (it is a folder; give a file name)")
    assert [p.name for p in folder.iterdir()] == ["inside"] and not leftovers(tmp_path)


def test_out_is_a_device(capsys, tmp_path: Path) -> None:
    device = special_file(tmp_path)
    kind_of = stat.S_IFMT(os.stat(device).st_mode)
    code, err = cli(capsys, "poison", "--data", write_dataset(tmp_path / "data"), "--out", device)
    assert_one_line_error(code, err, f"--out {device}: cannot write there (it is a device or special file, not a folder)")
    assert stat.S_IFMT(os.stat(device).st_mode) == kind_of and not leftovers(tmp_path)


def test_atomic_writes_translate_unusable_places(tmp_path: Path) -> None:
    from peftshield.errors import OutputError
    from peftshield.io import atomic_directory, atomic_write_json, atomic_write_text

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="file is a file, not a folder"):
        atomic_write_text(tmp_path / "file" / "a" / "b.json", "{}")
    with pytest.raises(OutputError, match="file is a file, not a folder"):
        with atomic_directory(tmp_path / "file" / "dir"):
            pass
    (tmp_path / "folder").mkdir()
    with pytest.raises(OutputError, match=r"folder: cannot write there \(it is a folder\)"):
        atomic_write_json(tmp_path / "folder", {"a": 1})
    assert not leftovers(tmp_path)


def test_os_error_escaping_a_command_is_one_line(capsys, tmp_path: Path) -> None:
    """``run`` writes its run folder itself; a file in the way must not end in a traceback."""
    data = write_dataset(tmp_path / "data")
    config = tmp_path / "grid.yaml"
    config.write_text(GRID.format(data=data))
    (tmp_path / "taken").write_text("x\n")
    code, err = cli(capsys, "run", config, "--out", tmp_path / "taken" / "run", "--no-progress")
    assert_one_line_error(code, err, "taken", "cannot write there", "not a folder")


# --- 3. damaged model files ------------------------------------------------------------------

def test_truncated_backbone_weights(capsys, tmp_path: Path, trained) -> None:
    backbone = copy_of(trained["backbone"], tmp_path)
    weights = backbone / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    code, err = cli(capsys, "finetune", "--backbone", backbone, "--data", trained["data"], "--out", tmp_path / "v", *FAST)
    assert_one_line_error(code, err, f"{weights}: damaged or truncated file", "re-create it")
    os.truncate(weights, 5)
    code, err = cli(capsys, "psim", "train", "--backbone", backbone, "--data", trained["data"], "--out", tmp_path / "p", "--no-progress")
    assert_one_line_error(code, err, f"{weights}: damaged or truncated file (cannot read safetensors header)")
    assert not (tmp_path / "v").exists() and not (tmp_path / "p").exists()


def test_truncated_trainable_tensors_of_a_victim_and_a_psim(capsys, tmp_path: Path, trained) -> None:
    victim, psim = copy_of(trained["victim"], tmp_path), copy_of(trained["psim"], tmp_path)
    for folder in (victim, psim):
        weights = folder / "trainable.safetensors"
        os.truncate(weights, weights.stat().st_size - 10)
    code, err = cli(capsys, "evaluate", "--model", victim, "--data", trained["data"], *EVALUATE)
    assert_one_line_error(code, err, f"{victim / 'trainable.safetensors'}: damaged or truncated file")
    os.truncate(psim / "trainable.safetensors", 3)
    code, err = cli(capsys, "scan", "--psim", psim, "--data", trained["data"] / "test.json", "--out", tmp_path / "s.jsonl", "--no-progress")
    assert_one_line_error(code, err, f"{psim / 'trainable.safetensors'}: damaged or truncated file (cannot read safetensors header); re-create it")


def test_corrupt_finetune_json(capsys, tmp_path: Path, trained) -> None:
    victim, psim = copy_of(trained["victim"], tmp_path), copy_of(trained["psim"], tmp_path)
    for folder in (victim, psim):
        text = (folder / "finetune.json").read_text()
        (folder / "finetune.json").write_text(text[: len(text) // 2])
    code, err = cli(capsys, "evaluate", "--model", victim, "--data", trained["data"], *EVALUATE)
    assert_one_line_error(code, err, f"{victim / 'finetune.json'}: damaged file")
    code, err = cli(capsys, "scan", "--psim", psim, "--data", trained["data"] / "test.json", "--out", tmp_path / "s.jsonl", "--no-progress")
    assert_one_line_error(code, err, f"{psim / 'finetune.json'}: damaged file")
    (victim / "finetune.json").write_text('{"method": "lora"}\n')
    code, err = cli(capsys, "evaluate", "--model", victim, "--data", trained["data"], *EVALUATE)
    assert_one_line_error(code, err, f"{victim / 'finetune.json'}: damaged file (no 'backbone')")


def test_fine_tuned_folder_passed_as_a_backbone(capsys, tmp_path: Path, trained) -> None:
    code, err = cli(capsys, "finetune", "--backbone", trained["victim"], "--data", trained["data"], "--out", tmp_path / "v", *FAST)
    line = assert_one_line_error(code, err, str(trained["victim"]), "fine-tuned module (method 'lora')", "--model", "--backbone",
                                 str(trained["backbone"]))
    assert "Unrecognized model" not in line and len(line) < 400
    code, err = cli(capsys, "psim", "train", "--backbone", trained["psim"], "--data", trained["data"], "--out", tmp_path / "p", "--no-progress")
    assert_one_line_error(code, err, "PSIM module (method 'ptuning')", "--psim", "--backbone", str(trained["backbone"]))


# --- 4. saved models find their backbone -------------------------------------------------------

def test_saved_psim_finds_its_backbone_from_another_folder_and_after_a_move(capsys, tmp_path: Path, monkeypatch) -> None:
    write_dataset(tmp_path / "i8" / "data")
    save_tiny_backbone(tmp_path / "i8" / "bb")
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "psim", "train", "--backbone", "i8/bb", "--data", "i8/data", "--out", "i8/psim", "--epochs", "1",
                    "--max-train-samples", "16", "--max-length", "32", "--no-progress")
    assert code == 0, err
    manifest = json.loads((tmp_path / "i8" / "psim" / "finetune.json").read_text())
    location = manifest["backbone_location"]
    assert manifest["backbone"] == str(tmp_path / "i8" / "bb") == location["path"]
    assert location["relative"] == "../bb" and location["given"] == "i8/bb" and len(location["sha256"]) == 16

    def scan(where: Path) -> tuple[int, str]:
        monkeypatch.chdir(where)
        return cli(capsys, "scan", "--psim", "psim", "--data", "data/test.json", "--out", "scores.jsonl", "--no-progress")

    code, err = scan(tmp_path / "i8")  # from inside i8/: the path as typed ('i8/bb') means nothing here
    assert code == 0, err
    reference = (tmp_path / "i8" / "scores.jsonl").read_text()
    shutil.move(tmp_path / "i8", tmp_path / "moved")  # the absolute path is gone; the relative one still holds
    code, err = scan(tmp_path / "moved")
    assert code == 0, err
    assert (tmp_path / "moved" / "scores.jsonl").read_text() == reference

    # another backbone at the same place: it loads, with a one-line warning
    shutil.rmtree(tmp_path / "moved" / "bb")
    save_tiny_backbone(tmp_path / "moved" / "bb", perturb=True)
    code, err = scan(tmp_path / "moved")
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("peftshield: warning:")]
    assert len(warning) == 1 and "psim/finetune.json" in warning[0] and "not the one this model was trained on" in warning[0]

    # gone: one line naming the finetune.json, the path and how to point at it
    shutil.rmtree(tmp_path / "moved" / "bb")
    code, err = scan(tmp_path / "moved")
    assert_one_line_error(code, err, "psim/finetune.json", str(tmp_path / "i8" / "bb"), "--backbone")

    # the override parameter the CLI's --backbone passes through
    from peftshield.finetune import load_finetuned

    save_tiny_backbone(tmp_path / "elsewhere")
    backbone, manifest = load_finetuned(tmp_path / "moved" / "psim", backbone=str(tmp_path / "elsewhere"))
    assert manifest["method"] == "ptuning" and backbone.num_labels == 2


def test_old_manifest_with_a_relative_backbone_says_how_to_point_at_it(capsys, tmp_path: Path, trained, monkeypatch) -> None:
    victim = copy_of(trained["victim"], tmp_path)
    manifest = json.loads((victim / "finetune.json").read_text())
    manifest.pop("backbone_location")
    manifest["backbone"] = "i8/bb"  # release 0.1 recorded the path as typed
    (victim / "finetune.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "evaluate", "--model", victim, "--data", trained["data"], *EVALUATE)
    assert_one_line_error(code, err, f"{victim / 'finetune.json'}", "'i8/bb'", "--backbone")


def test_self_contained_folder_works_without_its_backbone(tmp_path: Path, trained, monkeypatch) -> None:
    import numpy as np

    from peftshield.finetune import load_finetuned, save_finetuned
    from peftshield.models.inference import predict_proba

    backbone_dir = copy_of(trained["backbone"], tmp_path, "bb")
    victim = tmp_path / "victim"
    assert main(["finetune", "--backbone", str(backbone_dir), "--data", str(trained["data"]), "--out", str(victim), "--method", "lora", *FAST]) == 0
    loaded, manifest = load_finetuned(victim)
    texts = [t for t, _ in ROWS]
    expected = predict_proba(loaded.model, loaded.tokenizer, texts, 8, 32, False, "test")
    packed = tmp_path / "packed"
    save_finetuned(loaded.model, loaded.tokenizer, packed, manifest, self_contained=True)
    assert (packed / "backbone" / "model.safetensors").is_file() and (packed / "backbone" / "config.json").is_file()
    assert json.loads((packed / "finetune.json").read_text())["backbone_location"]["copy"] == "backbone"
    shutil.rmtree(backbone_dir)  # "another machine": the original backbone is gone
    moved = Path(shutil.move(packed, tmp_path / "far" / "away"))
    monkeypatch.chdir(tmp_path / "far")
    again, _ = load_finetuned("away")
    assert again.source == "away"
    np.testing.assert_allclose(predict_proba(again.model, again.tokenizer, texts, 8, 32, False, "test"), expected, atol=1e-6)
    assert moved.is_dir()


def test_aliases_are_recorded_as_given(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data")
    assert main(["finetune", "--backbone", "tiny", "--data", str(data), "--out", str(tmp_path / "v"), "--method", "lora", *FAST]) == 0
    manifest = json.loads((tmp_path / "v" / "finetune.json").read_text())
    assert manifest["backbone"] == "tiny" and "backbone_location" not in manifest
    from peftshield.finetune import load_finetuned

    assert load_finetuned(tmp_path / "v")[1]["method"] == "lora"


# --- 5. configs: YAML alias bombs, misspelt component options -------------------------------------

def alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]")
    return "\n".join(lines)


def test_yaml_alias_bomb_fails_at_once(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data")
    bomb = "\n".join("    " + line for line in alias_bomb().splitlines())
    config = tmp_path / "bomb.yaml"
    config.write_text(GRID.format(data=data) + "defense_options:\n  strip:\n" + bomb + "\n")
    anchor_line = GRID.count("\n") + 3
    started = time.monotonic()
    try:
        result = subprocess.run([str(PEFTSHIELD), "run", str(config), "--out", str(tmp_path / "run"), "--no-progress"],
                                capture_output=True, text=True, env=env(), timeout=90, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("peftshield run kept expanding the alias bomb for 90 s")
    seconds = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-2000:]
    line = assert_one_line_error(result.returncode, result.stderr, f"{config}:{anchor_line}:", "not allowed in config files")
    assert "&a0" in line
    assert seconds < 30, f"took {seconds:.1f} s"
    assert not (tmp_path / "run").exists()


def test_yaml_alias_in_a_finetune_config_names_the_line(capsys, tmp_path: Path) -> None:
    config = tmp_path / "ft.yaml"
    config.write_text("method: lora\noptions: {r: 4}\ntraining:\n  epochs: 1\n  batch_size: 8\n  max_length: 32\n")
    from peftshield.finetune import load_finetune_yaml

    assert load_finetune_yaml(config).method == "lora"  # plain files still load
    config.write_text("method: lora\nbase: &base {epochs: 1}\ntraining: *base\n")
    code, err = cli(capsys, "finetune", "--data", write_dataset(tmp_path / "data"), "--out", tmp_path / "o", "--config", config)
    assert_one_line_error(code, err, f"{config}:2:", "anchor '&base' is not allowed in config files")
    config.write_text("method: lora\ntraining: *base\n")
    code, err = cli(capsys, "finetune", "--data", tmp_path / "data", "--out", tmp_path / "o", "--config", config)
    assert_one_line_error(code, err, f"{config}:2:", "alias '*base' is not allowed")


def test_a_misspelt_component_option_names_the_component_and_the_option(capsys, tmp_path: Path) -> None:
    """In a grid config and in a ``--trigger-option`` flag, before any work."""
    data = write_dataset(tmp_path / "data")
    config = tmp_path / "grid.yaml"
    config.write_text(GRID.format(data=data).replace("defenses: [psim]", "defenses: [{name: strip, options: {num_perturbatons: 2}}]"))
    code, err = cli(capsys, "run", config, "--out", tmp_path / "run", "--no-progress")
    assert_one_line_error(code, err, str(config), "defense 'strip'", "num_perturbatons", "unknown option")
    code, err = cli(capsys, "poison", "--data", data, "--out", tmp_path / "poisoned", "--trigger-option", "wordz=mn")
    assert_one_line_error(code, err, "trigger 'badnet'", "wordz", "unknown option")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "grid.yaml"]


# --- 6. permissions of written files -----------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_outputs_get_the_users_umask(tmp_path: Path, umask: int) -> None:
    import torch
    from safetensors.torch import save_file

    from peftshield.io import atomic_directory, atomic_write_json, atomic_write_text

    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "b.json", {"x": 1})
        with atomic_directory(tmp_path / "folder") as tmp:
            atomic_write_json(tmp / "inner.json", {})
            (tmp / "sub").mkdir(mode=0o700)
            save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "weights.safetensors"))  # safetensors writes 0600
            os.chmod(tmp / "sub" / "weights.safetensors", 0o600)
    finally:
        os.umask(previous)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    files = [tmp_path / "a.txt", tmp_path / "b.json", tmp_path / "folder" / "inner.json", tmp_path / "folder" / "sub" / "weights.safetensors"]
    assert [mode(f) for f in files] == [0o666 & ~umask] * len(files)
    assert mode(tmp_path / "folder") == mode(tmp_path / "folder" / "sub") == 0o777 & ~umask


def test_cli_outputs_are_readable_by_the_group(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data")
    for command in (["poison", "--data", str(data), "--out", str(tmp_path / "poisoned"), "--rate", "0.25"],
                    ["finetune", "--backbone", "tiny", "--data", str(data), "--out", str(tmp_path / "victim"), *FAST]):
        result = subprocess.run([str(PEFTSHIELD), *command], capture_output=True, text=True, env=env(), preexec_fn=lambda: os.umask(0o022))
        assert result.returncode == 0, result.stderr
    for out in (tmp_path / "poisoned", tmp_path / "victim"):
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {p.name: 0o644 for p in out.iterdir()}
    assert (tmp_path / "victim" / "trainable.safetensors").is_file()
