"""The README's Layout names every module of the package, under its own folder.

Read from the source tree, so that a module added without a word in the README fails here
rather than leaving the next reader a map with holes in it.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout() -> dict[str, set[str]]:
    """Folder (``""`` for the package itself) -> the module names its lines mention."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    named: dict[str, set[str]] = {}
    folder = None
    for line in block.splitlines():
        head = re.match(r"^ {2}(\w+)/\s", line)
        if line.startswith("pipeline/"):
            folder = ""
            continue
        if head:
            folder = head.group(1)
        elif re.match(r"^\S", line):
            folder = None  # a top-level entry of the repository: the package's part is over
        if folder is not None:
            named.setdefault(folder, set()).update(re.findall(r"\w+", line))
    return named


def test_every_module_is_in_the_readme_layout():
    named = _layout()
    missing = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        rel = path.relative_to(ROOT / "pipeline")
        if rel.name == "__main__.py" or "migrations" in rel.parts:
            continue
        folder = rel.parts[0] if len(rel.parts) > 1 else ""
        if rel.name == "__init__.py":
            if len(rel.parts) <= 2:
                continue  # the package's or a folder's own: the folder's line stands for it
            stem = rel.parent.name  # a nested package: named on its folder's lines
        else:
            stem = rel.stem
        if stem not in named.get(folder, set()):
            missing.append(str(rel))
    assert not missing, f"modules the README's Layout does not name: {missing}"


# `pipeline.a.b` or `pipeline/a/b.py`, written in prose, code or comments.
DOTTED = re.compile(r"(?<![\w./-])pipeline(?:\.[A-Za-z_]\w*)+")
PATHS = re.compile(r"(?<![\w./-])pipeline/[\w/]+(?:\.py|/)")


# Names that are not modules on purpose: Celery task names, and the embedded server's module
# name before 0.2 (matched in an old server's command line).
NOT_MODULES = {"pipeline.route_batch", "pipeline.curate_part", "pipeline.similar",
               "pipeline.storage.local_graph"}


def _resolves(dotted: str) -> bool:
    if dotted in NOT_MODULES:
        return True
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_names_and_paths_the_docs_give_exist():
    """Every ``pipeline.x.y`` and ``pipeline/x.py`` in the README, `.env.example` and the
    package's own docstrings and comments names something that is there."""
    sources = [ROOT / "README.md", ROOT / ".env.example", ROOT / "docker-compose.yml",
               *sorted((ROOT / "pipeline").rglob("*.py"))]
    gone = []
    for src in sources:
        text = src.read_text()
        for name in sorted(set(DOTTED.findall(text))):
            if not _resolves(name.rstrip(".")):
                gone.append(f"{src.relative_to(ROOT)}: {name}")
        for path in sorted(set(PATHS.findall(text))):
            if not (ROOT / path).exists():
                gone.append(f"{src.relative_to(ROOT)}: {path}")
    assert not gone, "\n".join(gone)
