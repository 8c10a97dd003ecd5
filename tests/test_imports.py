"""The package's imports run one way: no cycle, and the layers keep their order.

Each module of `pipeline` is imported in a fresh interpreter (so nothing another module
imported first can hide a missing import), and the module-level import graph, read from the
source with `ast`, must have no cycle and must respect the layering of the architecture:
`cli` -> `jobs`, `stats`, `queue` -> `stages` -> {`librarian`, `dedup`, `encoders`, `serving`}
-> {`moe`, `storage`} -> {`records`, `errors`, `settings`}.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

# Fresh interpreters importing torch: seconds each, out of the editing tier.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1] / "pipeline"


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The `pipeline` modules imported at module level (not inside functions)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in tree.body:
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            continue  # for type checkers only: never executed
        out |= {t for t in targets if t in MODULES and t != name}
    return out | _imports_by_name(tree, name)


def _imports_by_name(tree: ast.Module, name: str) -> set[str]:
    """Modules named to `importlib.import_module` or `__import__` anywhere in the file: an
    import by string is still an import, and must keep the layering too."""
    out = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            continue
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if called in ("import_module", "__import__") and node.args[0].value in MODULES:
            out.add(node.args[0].value)
    return out - {name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}

# Lower layers never import higher ones (a module may import its own layer or below).
LAYERS = [
    {"pipeline.errors", "pipeline.settings", "pipeline.records", "pipeline.redact",
     "pipeline.tokens"},
    {"pipeline.moe", "pipeline.storage", "pipeline.cache", "pipeline.inputs",
     "pipeline.isolation", "pipeline.lexical", "pipeline.quality", "pipeline.topics"},
    {"pipeline.encoders", "pipeline.dedup", "pipeline.librarian", "pipeline.serving"},
    {"pipeline.runtime"},
    {"pipeline.stages", "pipeline.retract"},
    {"pipeline.queue", "pipeline.jobs", "pipeline.stats", "pipeline.training", "pipeline.api"},
    {"pipeline.service"},
    {"pipeline.cli"},
]


def _layer(name: str) -> int:
    for i, group in enumerate(LAYERS):
        if any(name == g or name.startswith(g + ".") for g in group):
            return i
    return -1


def test_every_module_is_placed_in_a_layer():
    unplaced = sorted(n for n in MODULES if n != "pipeline" and _layer(n) < 0)
    assert not unplaced, f"modules outside the layering: {unplaced}"


def test_the_module_import_graph_has_no_cycle():
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_imports_run_down_the_layers():
    upward = sorted(f"{a} -> {b}" for a, deps in GRAPH.items() for b in deps
                    if a != "pipeline" and b != "pipeline" and _layer(b) > _layer(a))
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_an_import_by_name_is_seen():
    tree = ast.parse('import importlib\ndef f():\n    importlib.import_module("pipeline.runtime")')
    assert _imports_by_name(tree, "pipeline.moe.system") == {"pipeline.runtime"}


def test_the_model_package_does_no_io():
    """`pipeline.moe` is pure torch: it imports nothing of the package above it."""
    outside = sorted(f"{a} -> {b}" for a, deps in GRAPH.items() if a.startswith("pipeline.moe")
                     for b in deps if not b.startswith("pipeline.moe")
                     and b not in ("pipeline.errors", "pipeline"))
    assert not outside, outside


# Alembic's scripts run only inside Alembic; the task module binds to an app (test below).
IMPORTABLE = sorted(n for n in MODULES if not n.startswith("pipeline.storage.migrations")
                    and n != "pipeline.queue.tasks")


def test_every_module_imports_in_a_fresh_interpreter():
    code = f"import importlib\nfor name in {IMPORTABLE!r}:\n    importlib.import_module(name)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_task_module_imports_after_its_app():
    """Tasks are shared tasks: they bind to the app a worker builds."""
    code = ("from pipeline.queue.app import make_app; from pipeline.settings import Settings;"
            "app = make_app(Settings()); import pipeline.queue.tasks; app.loader.import_"
            "default_modules(); print(sorted(t for t in app.tasks if t.startswith('pipeline')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pipeline.route_batch" in proc.stdout and "pipeline.curate_part" in proc.stdout
    assert "pipeline.similar" in proc.stdout and "pipeline.forget" in proc.stdout


def test_cli_help_does_not_import_torch():
    code = ("import sys; from pipeline.cli import cli; "
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.split() == ["False", "False"], proc.stdout + proc.stderr


def test_a_model_without_a_compiler_in_sight_does_not_import_it():
    """Loading and running the model does not import torch._dynamo (1.4 s here) on a machine
    whose kernels cannot run (no CUDA, no Triton interpreter): most model processes (a CLI
    command, a worker) never compile."""
    import os

    import torch

    if torch.cuda.is_available():
        pytest.skip("with CUDA the kernels' checks are the compiler's constants")
    code = ("import sys, torch; from pipeline.moe.config import MoEConfig; "
            "from pipeline.moe.system import MixtureOfExpertsSystem as M; import "
            "pipeline.training, pipeline.serving; s = M(MoEConfig(input_dim=8, hidden_dim=8, "
            "output_dim=8, num_experts=4, top_k_experts=2, num_layers=1, "
            "constellations={'a': [0, 1], 'b': [2, 3]})); s.eval(); s(torch.randn(4, 8)); "
            "print('torch._dynamo' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.stdout.split() == ["False"], proc.stdout + proc.stderr[-2000:]
