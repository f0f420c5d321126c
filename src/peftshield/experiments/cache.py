"""Stages cached by a content hash of their inputs, and the lock that keeps one run per folder.

A stage's key hashes the canonical JSON of everything that decides its output (data,
settings, seed, the keys of the stages it builds on, the peftshield version), so a
weight-poisoned backbone is trained once and reused by every cell that needs it, and a
changed setting can never pick up a stale artefact.

A stage is built in a temporary sibling folder named after its host and process
(``.<key>.<host>-<pid>-<token>.tmp``) and renamed into place. Its ``stage.json`` is written
last and lists every file of the stage with its size; a stage whose files do not match
that list (a half-copied or damaged folder) is rebuilt, not reused. Leftover temporary
folders are removed only when the process that made them is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from peftshield.errors import ConfigError

STAGE_FILE = "stage.json"
KEY_LENGTH = 16
LOCK_FILE = ".run.lock"
LOCK_OWNER_FILE = ".run.lock.owner"


def canonical_json(payload: object) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


def stage_key(kind: str, inputs: dict) -> str:
    """``kind-<first 16 hex digits of sha256(canonical inputs)>``: stable across runs and machines."""
    return f"{kind}-{hashlib.sha256(canonical_json({'kind': kind, **inputs}).encode()).hexdigest()[:KEY_LENGTH]}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _file_sizes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file() and p.name != STAGE_FILE}


class StageCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def _stage(self, key: str) -> dict | None:
        try:
            with open(self.path(key) / STAGE_FILE, encoding="utf-8") as handle:
                return json.load(handle)
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def done(self, key: str) -> bool:
        """True when the stage exists and every file its ``stage.json`` lists is there, whole."""
        stage = self._stage(key)
        if stage is None or "files" not in stage:
            return False
        directory = self.path(key)
        for name, size in stage["files"].items():
            file = directory / name
            if not file.is_file() or file.stat().st_size != size:
                return False
        return True

    def result(self, key: str) -> dict:
        stage = self._stage(key)
        if stage is None:
            raise ConfigError(f"{self.path(key) / STAGE_FILE}: missing or damaged stage record")
        return stage["record"]

    def _remove_dead_leftovers(self, key: str) -> None:
        """Remove temporary folders of this stage left by processes of this host that are gone."""
        host = socket.gethostname()
        for leftover in self.root.glob(f".{key}.*.tmp"):
            owner_host, _, rest = leftover.name[len(key) + 2 :].rpartition("-")[0].rpartition("-")
            pid = rest if rest.isdigit() else ""
            if owner_host == host and pid and not _process_alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)

    def compute(self, key: str, inputs: dict, build: Callable[[Path], dict]) -> tuple[dict, bool]:
        """The stage's record, building it into a fresh directory if it is not cached whole.

        Returns (record, was_cached). ``build(directory)`` writes its artefacts there and
        returns a JSON-able record, saved in ``stage.json`` with the inputs and the file list."""
        if self.done(key):
            return self.result(key), True
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_dead_leftovers(key)
        tmp = self.root / f".{key}.{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:  # mkdir inside: a Ctrl-C that lands as mkdir returns must remove the folder too
            tmp.mkdir()
            record = build(tmp)
            stage = {"key": key, "inputs": inputs, "record": record, "files": _file_sizes(tmp)}
            (tmp / STAGE_FILE).write_text(json.dumps(stage, indent=2, default=str) + "\n", encoding="utf-8")
            final = self.path(key)
            if final.exists():  # an incomplete or damaged stage: replace it whole
                aside = self.root / f".{key}.{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.old.tmp"
                os.replace(final, aside)
                shutil.rmtree(aside, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.result(key), False


@contextlib.contextmanager
def run_lock(run_dir: str | Path, wait: bool = False) -> Iterator[Path]:
    """Hold the run folder for this process. A second process waits (``wait``) or gets a
    one-line error naming the process that holds it. The lock is an OS file lock, released
    when its process ends, so a killed run's lock is taken over by the next one."""
    from filelock import FileLock, Timeout

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK_FILE))
    owner_file = run_dir / LOCK_OWNER_FILE
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        try:
            owner = json.loads(owner_file.read_text(encoding="utf-8"))
            holder = f"process {owner['pid']} on {owner['host']} ({owner['command']}, since {owner['started']})"
        except (OSError, ValueError, KeyError):
            holder = "another process"
        raise ConfigError(f"{run_dir}: in use by {holder}; wait for it to finish, or pass --wait") from None
    try:
        owner_file.write_text(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:200],
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }), encoding="utf-8")
        yield run_dir
    finally:
        with contextlib.suppress(OSError):
            owner_file.unlink()
        lock.release()
