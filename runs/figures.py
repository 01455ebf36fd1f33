"""The user guide's pictures (docs/img/*.png), made with the commands the guide shows.

    python runs/figures.py        # about two minutes on a laptop: plans, one verify compile, a 60-step run

Runs `autoshard` in this process (8 emulated CPU devices), in a temporary folder:

    autoshard plan --model gpt-tiny --cluster cpu:8 --batch 16 --seq 128 --mesh tensor=2 -o p.json
    autoshard explain p.json --plot docs/img/explain.png
    autoshard verify p.json --plot docs/img/verify.png
    autoshard plan --model gpt-175b --cluster a100-80g:1024 --batch 1536 --seq 2048 -o p175.json
    autoshard explain p175.json --plot docs/img/explain-pipeline.png
    autoshard train --steps 60 --eval-every 20 --out run
    autoshard report run -o docs/img/report.png

then stores each picture with a palette of 128 colours (Pillow, which matplotlib installs), a third of the size, so
the repository stays small.
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"
sys.path.insert(0, str(ROOT))


def autoshard(*args: str) -> None:
    """`autoshard ARGS` in this process, its output hidden; a failure stops the script with that output."""
    from autoshard import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main(list(args))
    if code != 0:
        sys.exit(f"autoshard {' '.join(args)} exited with {code}:\n{out.getvalue()}")
    print(f"autoshard {' '.join(args)}")


def shrink(path: Path) -> None:
    """Store `path` with a 128-colour palette (the pictures are flat colours and text)."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=128)
    small.save(path, optimize=True)


def main() -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    pictures = {name: str(IMG / f"{name}.png") for name in ("explain", "verify", "explain-pipeline", "report")}
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        autoshard("plan", "--model", "gpt-tiny", "--cluster", "cpu:8", "--batch", "16", "--seq", "128", "--mesh",
                  "tensor=2", "-o", "p.json")
        autoshard("explain", "p.json", "--plot", pictures["explain"])
        autoshard("verify", "p.json", "--plot", pictures["verify"])
        autoshard("plan", "--model", "gpt-175b", "--cluster", "a100-80g:1024", "--batch", "1536", "--seq", "2048",
                  "-o", "p175.json")
        autoshard("explain", "p175.json", "--plot", pictures["explain-pipeline"])
        autoshard("train", "--steps", "60", "--eval-every", "20", "--out", "run")
        autoshard("report", "run", "-o", pictures["report"])
    for path in pictures.values():
        shrink(Path(path))
        print(f"{Path(path).relative_to(ROOT)}: {Path(path).stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
