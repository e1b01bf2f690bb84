"""The shape of the code: imports point one way along the pipeline, defaults live in one place, YAMLs say how
they are used."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml
from omegaconf import MISSING

from helpers import CONF, ROOT
from qlora_lab.core import schema

PACKAGE = ROOT / "src" / "qlora_lab"
# A package may import from packages of a lower rank (and from itself), never from a higher or an equal one:
# core <- the stages <- train <- runner. Stages of one rank do not know each other.
RANK = {"core": 0, "sinks": 1, "data": 1, "model": 2, "memory": 3, "evaluation": 3, "train": 4, "runner": 5}
RANK["export"] = 6  # after training: may import from every other package
RANK["study"] = 6  # studies (reproduce, rerun): run the runner and read what runs wrote


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def own_imports(tree: ast.AST, module: str) -> list[tuple[str, bool]]:
    """(imported qlora_lab module, imported inside a function?) for every import of the package's own modules."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names if a.name.startswith("qlora_lab"))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("qlora_lab"):
                for a in child.names:  # `from qlora_lab.train import step` imports the module qlora_lab.train.step
                    sub = f"{child.module}.{a.name}"
                    found.append((sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file()
                                  or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else child.module, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Module-level import edges between the package's modules, and every import hidden inside a function."""
    graph, hidden = {}, []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        edges = own_imports(ast.parse(path.read_text()), name)
        graph[name] = {m for m, inside in edges if not inside and m != name}
        hidden += [f"{name} imports {m} inside a function" for m, inside in edges if inside]
    return graph, hidden


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANK) else None


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports against the pipeline's direction, and import cycles."""
    out = []
    for src, targets in graph.items():
        for dst in targets:
            a, b = package_of(src), package_of(dst)
            if a is None or b is None or a == b:
                continue
            if RANK[b] >= RANK[a]:
                out.append(f"{src} ({a}) imports {dst} ({b}): imports point core <- stages <- train <- runner")
    state: dict[str, int] = {}

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                out.append("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [node, nxt]))
            elif nxt not in state:
                dfs(nxt, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node, [])
    return out


def test_imports_point_one_way_without_cycles():
    graph, hidden = import_graph()
    assert {package_of(m) for m in graph} - {None} == set(RANK), "every subpackage has a rank"
    assert violations(graph) == []
    assert hidden == [], "imports of the package's own modules belong at the top of the file"


def test_the_layout_check_catches_what_it_is_for():
    """The checker itself: an upward import and a cycle are reported."""
    upward = {"qlora_lab.core.x": {"qlora_lab.train.y"}, "qlora_lab.train.y": set()}
    assert "imports point core <- stages" in violations(upward)[0]
    sideways = {"qlora_lab.data.x": {"qlora_lab.sinks.y"}, "qlora_lab.sinks.y": set()}
    assert violations(sideways)
    cycle = {"qlora_lab.train.a": {"qlora_lab.train.b"}, "qlora_lab.train.b": {"qlora_lab.train.a"}}
    assert any(v.startswith("import cycle") for v in violations(cycle))
    hidden = own_imports(ast.parse("def f():\n    from qlora_lab.core import spec\n"), "qlora_lab.x")
    assert hidden == [("qlora_lab.core.spec", True)]


def _schemas(cls=schema.TrainConfig):
    yield cls
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else getattr(schema, str(f.type), None)):
            yield from _schemas(getattr(schema, str(f.type)) if isinstance(f.type, str) else f.type)


def test_defaults_live_in_the_yaml_only():
    """Every schema field is MISSING: its value comes from conf/, never from a second default in code."""
    classes = {c.__name__: c for c in _schemas()}
    assert set(classes) == {n for n, c in vars(schema).items() if dataclasses.is_dataclass(c)}  # all reached
    with_default = [f"{name}.{f.name}" for name, c in classes.items() for f in dataclasses.fields(c)
                    if f.default is not MISSING or f.default_factory is not dataclasses.MISSING]
    assert with_default == []


@pytest.mark.parametrize("path", sorted(p.relative_to(CONF) for p in CONF.rglob("*.yaml")), ids=str)
def test_every_yaml_starts_with_the_command_that_uses_it(path):
    text = (CONF / path).read_text()
    head = [line for line in text.splitlines() if line.startswith("#")][:6]
    assert any("python train.py" in line for line in head), f"conf/{path}: no `# python train.py ...` header"
    yaml.safe_load(text)
