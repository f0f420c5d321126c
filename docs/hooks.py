"""mkdocs hook: the plots the bench files show (bench/*.png) are served beside the results
pages that include those files, so an included ``![...](name.png)`` resolves; nothing is copied
into docs/."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent


def on_files(files, config):
    for png in sorted((ROOT / "bench").glob("*.png")):
        files.append(File.generated(config, f"results/{png.name}", abs_src_path=str(png)))
    return files
