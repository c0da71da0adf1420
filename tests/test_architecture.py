"""The package's shape: the config at the bottom (no torch), no import cycles, no hidden imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lisa_align"
HEAVY = ("torch", "transformers", "peft")
# Functions that may import lisa_align lazily: the CLI's entry points (a command loads only what it runs).
ENTRY_POINTS = {("cli.py", name) for name in ("cmd_run", "cmd_demo", "cmd_evaluate", "cmd_plan", "cmd_sweep",
                                               "cmd_report", "cmd_gate")}
ENTRY_POINTS.add(("__init__.py", "__getattr__"))  # lisa_align.training's optional extra (TRL) loads on first use


def _module_name(path: Path) -> str:
    parts = ["lisa_align", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The lisa_align modules an import statement loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "lisa_align"]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against this module's package
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            name = ".".join(base + ([node.module] if node.module else []))
        else:
            name = node.module or ""
        if name.split(".")[0] != "lisa_align":
            return []
        subs = [f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in MODULES]
        return subs or [name]
    return []


def _imports(top_level_only: bool):
    """{module: {imported module: line}} over the source tree."""
    edges: dict[str, dict[str, int]] = defaultdict(dict)
    hidden = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        inside = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if _targets(node, module, is_package):
                        inside.add(id(node))
                        if (path.name, fn.name) not in ENTRY_POINTS:
                            hidden.append(f"{path.relative_to(SRC.parent)}:{node.lineno} (in {fn.name})")
        for node in ast.walk(tree):
            if top_level_only and id(node) in inside:
                continue
            for target in _targets(node, module, is_package):
                edges[module].setdefault(target, node.lineno)
    return edges, hidden


def _package(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


@pytest.mark.parametrize("module", ["config", "defenses", "rundir", "report", "sweep"])
def test_config_and_the_tools_that_only_read_configs_import_no_torch_transformers_or_peft(module):
    """`lisa report` and sweep planning (Slurm) do not pay for a training stack they do not use."""
    code = (f"import lisa_align.{module}, sys; "
            f"print(','.join(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_no_import_cycles_between_packages():
    edges, _ = _imports(top_level_only=False)
    graph: dict[str, set[str]] = defaultdict(set)
    for src, targets in edges.items():
        for dst in targets:
            a, b = _package(src), _package(dst)
            if a != b and a != "cli":  # the CLI is the top: it may import anything, lazily
                graph[a].add(b)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_import_cycles_between_modules():
    edges, _ = _imports(top_level_only=True)
    graph = {src: {t for t in targets if t in MODULES and t != src} for src, targets in edges.items()}
    # a package's __init__ importing its own modules is its public face, not a dependency cycle
    for src in graph:
        graph[src] = {t for t in graph[src] if not (MODULES[src].name == "__init__.py" and t.startswith(src + "."))}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_lisa_align_import_is_hidden_inside_a_function():
    _, hidden = _imports(top_level_only=False)
    assert hidden == []


def test_the_layers_point_down():
    """The config, the defenses' settings and the run folder sit at the bottom: they import neither
    the training stack nor evaluation."""
    edges, _ = _imports(top_level_only=False)
    low = ("config", "defenses", "rundir", "io", "errors", "data")
    high = {"models", "training", "evaluation", "pipeline", "sweep", "report", "cli"}
    for src, targets in edges.items():
        if _package(src) in low:
            bad = sorted({_package(t) for t in targets} & high)
            assert not bad, f"{src} imports {bad}"


@pytest.mark.parametrize("source,expected", [
    ("def f():\n    from lisa_align.io import read_json\n", ["lisa_align/x.py:2 (in f)"]),
    ("import lisa_align.io\n", []),
    ("def f():\n    import torch\n", []),
])
def test_the_scan_finds_a_hidden_import(tmp_path, monkeypatch, source, expected):
    (tmp_path / "lisa_align").mkdir()
    path = tmp_path / "lisa_align" / "x.py"
    path.write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path / "lisa_align")
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {"lisa_align.x": path})
    assert _imports(top_level_only=False)[1] == expected


def test_the_scan_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_config_knows_the_judges_of_the_evaluation_registries(monkeypatch):
    """The config checks judge names without importing the judges: its name lists follow the registries."""
    from lisa_align import config
    from lisa_align.evaluation.judges import JUDGES
    from lisa_align.evaluation.pairwise import PAIRWISE_JUDGES, PairwiseJudge, register_pairwise_judge

    assert config.JUDGE_NAMES == set(JUDGES)
    assert config.PAIRWISE_JUDGE_NAMES == set(PAIRWISE_JUDGES)
    monkeypatch.setattr(config, "PAIRWISE_JUDGE_NAMES", set(config.PAIRWISE_JUDGE_NAMES))
    import lisa_align.evaluation.pairwise as pairwise

    monkeypatch.setattr(pairwise, "PAIRWISE_JUDGE_NAMES", config.PAIRWISE_JUDGE_NAMES)
    monkeypatch.setattr(pairwise, "PAIRWISE_JUDGES", dict(PAIRWISE_JUDGES))
    with pytest.raises(config.LisaError, match="unknown pairwise judge 'My-Judge'"):
        config.validate_config({"eval": {"pairwise_judge": "My-Judge"}})
    register_pairwise_judge("my_judge", PairwiseJudge)
    assert config.validate_config({"eval": {"pairwise_judge": "My-Judge"}}).eval.pairwise_judge == "My-Judge"
