"""AG's News with a training split: the shared copy (HiddenKiller's) has only dev (10,000
rows) and test (7,600), so its dev set is shuffled once (seed 0) and split 8,000 train /
2,000 dev; test is kept as it is. Writes JSON lines the loader reads:

    .venv/bin/python bench/split_ag.py [--source ../shared/data/hiddenkiller/clean/ag] [--out runs/data/ag]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from peftshield.data.loaders import load_texts
from peftshield.data.writers import write_split_jsonl

TRAIN_ROWS = 8000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default="../shared/data/hiddenkiller/clean/ag")
    parser.add_argument("--out", default="runs/data/ag")
    args = parser.parse_args()
    dev = load_texts(args.source, "dev", skip_empty=True)
    test = load_texts(args.source, "test", skip_empty=True)
    order = np.random.default_rng(0).permutation(len(dev))
    out = Path(args.out)
    write_split_jsonl(dev.subset(order[:TRAIN_ROWS]), out / "train.json")
    write_split_jsonl(dev.subset(order[TRAIN_ROWS:]), out / "dev.json")
    write_split_jsonl(test, out / "test.json")
    print(f"{out}: train {TRAIN_ROWS}, dev {len(dev) - TRAIN_ROWS} (both from {args.source} dev), test {len(test)}")


if __name__ == "__main__":
    main()
