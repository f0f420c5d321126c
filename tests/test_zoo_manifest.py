"""Zoo v2's frozen manifest (bench/zoo/manifest.json): it is what the recipes say, its halves
follow the recorded rule, and no test trigger shares a word with a design trigger."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "zoo"))

import recipes  # noqa: E402


def manifest() -> list[dict]:
    return json.loads((ROOT / "bench" / "zoo" / "manifest.json").read_text(encoding="utf-8"))["entries"]


def test_the_committed_manifest_is_what_the_recipes_make() -> None:
    made = [recipes.asdict(e) for e in recipes.zoo()]
    assert made == manifest(), "bench/zoo/manifest.json is stale: run .venv/bin/python bench/zoo/recipes.py (and say why in revisions.md)"


def test_each_half_is_the_hash_of_its_slot_and_the_test_half_is_large_enough() -> None:
    entries = manifest()
    for e in entries:
        bit = int(hashlib.sha256(("peftshield-zoo-v2:" + e["slot"]).encode()).hexdigest(), 16) % 2
        assert e["split"] == ("test" if bit else "design"), e["name"]
        assert (e["trigger"] or "") not in e["slot"] or not e["trigger"], e["name"]  # the slot holds no trigger
    test = [e for e in entries if e["split"] == "test"]
    assert len(entries) >= 200 and len(test) >= 100
    for half in ("design", "test"):
        part = [e for e in entries if e["split"] == half]
        assert {e["kind"] for e in part} == {"checkpoint", "adapter", "victim", "encoder"}
        assert len({e["task"] for e in part}) >= 5
        assert any(e["backdoored"] for e in part) and any(not e["backdoored"] for e in part)


def test_test_triggers_share_no_word_with_design_triggers() -> None:
    def words(half: str) -> set[str]:
        found = set()
        for e in manifest():
            if e["split"] == half and e["trigger"]:
                found |= {w.strip(".,").lower() for w in e["trigger"].replace(",", " ").split()}
        return found

    design, test = words("design"), words("test")
    assert design and test
    common = design & test - {"the", "a", "i", "no", "this", "that", "was", "we", "she", "my", "all", "before", "day"}
    assert not common, common
