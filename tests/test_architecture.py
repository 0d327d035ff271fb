"""The package's shape: imports between l3m's modules go one way (no cycle), modules stay small, and every command
and subcommand answers ``--help``."""

from __future__ import annotations

import ast
import os

import pytest

from l3m.cli import COMMANDS, REWARD_COMMANDS, main

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src", "l3m")


def _module_name(path: str) -> str:
    parts = os.path.relpath(path, os.path.dirname(SRC))[:-3].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, str]:
    return {_module_name(os.path.join(root, name)): os.path.join(root, name)
            for root, _, names in os.walk(SRC) for name in names if name.endswith(".py")}


def import_graph() -> dict[str, set[str]]:
    """Module -> the l3m modules it imports, at module level or inside functions (``from l3m.x import y`` counts
    ``l3m.x.y`` when that is a module, else ``l3m.x``). Imports under ``if TYPE_CHECKING:`` do not count."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        type_checking = {id(node) for guard in ast.walk(tree) if isinstance(guard, ast.If)
                         and getattr(guard.test, "id", "") == "TYPE_CHECKING" for node in ast.walk(guard)}
        targets = set()
        for node in ast.walk(tree):
            if id(node) in type_checking:
                continue
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                            for alias in node.names}
        graph[module] = {t for t in targets if t in modules and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_l3m_modules_import_each_other_without_cycles():
    graph = import_graph()
    assert "l3m.loading" in graph["l3m.training.run"]  # the graph sees imports inside functions
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("layer, lower", [
    ("l3m.cli", ()),
    ("l3m.experiments", ("l3m.cli",)),
    ("l3m.training", ("l3m.cli", "l3m.experiments", "l3m.alignment")),
    ("l3m.alignment", ("l3m.cli", "l3m.experiments", "l3m.training")),
    ("l3m.solvers", ("l3m.cli", "l3m.experiments", "l3m.training", "l3m.alignment", "l3m.rewards", "l3m.sampling")),
    ("l3m.constraints", ("l3m.cli", "l3m.experiments", "l3m.training", "l3m.alignment", "l3m.solvers")),
])
def test_imports_go_one_way(layer, lower):
    """command line -> experiments -> training | alignment -> solvers | constraints -> rewards -> sampling, data ->
    errors. Training and alignment sit side by side: neither imports the other."""
    for module, targets in import_graph().items():
        if module == layer or module.startswith(layer + "."):
            upward = sorted(t for t in targets for up in lower if t == up or t.startswith(up + "."))
            assert not upward, f"{module} imports {upward}"


def test_modules_stay_small():
    sizes = {module: sum(1 for _ in open(path, encoding="utf-8")) for module, path in _modules().items()}
    assert sizes["l3m.cli"] < 150
    assert not {m: n for m, n in sizes.items() if n > 400}


HELP_COMMANDS = [[name] for name in COMMANDS if name != "reward"] + [["reward", name] for name in REWARD_COMMANDS]


def test_every_command_is_walked():
    assert {tuple(c) for c in HELP_COMMANDS} >= {("train",), ("eval",), ("compare",), ("demo",), ("reward", "train"),
                                                 ("reward", "build-standin"), ("reward", "experiment")}


@pytest.mark.parametrize("command", [[], ["reward"], *HELP_COMMANDS], ids=lambda c: " ".join(c) or "l3m")
def test_every_command_answers_help(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr()
    assert "usage: l3m" in out.out and "Traceback" not in out.err, out.err
    if command and command != ["reward"]:
        assert "--config" in out.out and "--seed" in out.out  # the parser's fields, not a hand-written text
