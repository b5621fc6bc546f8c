"""The edge's shape, read from its source: no import circle, and imports in the order a request travels.

A request goes front door (``proxy``) -> ``routing`` -> ``targets`` -> ``upstream``; a module may
import only modules further along (or beside the path: config, machines, status), never one
before it. The Fly grammar sits below both the layer and the edge and imports neither.
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fly_replay_router.edge.fleet import Fleet
from fly_replay_router.edge.machine import Machine
from fly_replay_router.edge.status import EdgeStatus

PACKAGE = Path(__file__).resolve().parents[2] / "fly_replay_router"
EDGE = "fly_replay_router.edge"
REQUEST_PATH = ("proxy", "routing", "targets", "upstream")
# Modules above the front door: they start or run the proxy.
ENTRY_POINTS = {"__init__", "__main__", "launch", "serve"}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, TYPE_CHECKING blocks and function bodies included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _edge_graph() -> dict[str, set[str]]:
    modules = {path.stem: path for path in (PACKAGE / "edge").glob("*.py")}
    return {
        name: {imported.split(".")[2] for imported in _imports(path) if imported.startswith(f"{EDGE}.")} & set(modules)
        for name, path in modules.items()
    }


def test_the_edge_has_no_import_circle() -> None:
    graph = _edge_graph()
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            assert state.get(imported) != "open", f"import circle: {' -> '.join([*trail, module, imported])}"
            if imported not in state:
                visit(imported, [*trail, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_edge_modules_import_in_the_order_a_request_travels() -> None:
    graph = _edge_graph()
    for earlier, later in itertools.pairwise(REQUEST_PATH):
        assert later in graph[earlier], f"{earlier} should hand the request to {later}"
    rank = {name: index for index, name in enumerate(REQUEST_PATH)}
    for module, imported in graph.items():
        for target in imported:
            if module in rank and target in rank:
                assert rank[target] > rank[module], f"{module} imports {target}, which comes before it"
            if target == "proxy":
                assert module in ENTRY_POINTS, f"{module} reaches back up to the proxy"


@pytest.mark.parametrize("part", ["fly", "edge"])
def test_the_fly_grammar_and_the_edge_do_not_import_the_layer(part: str) -> None:
    forbidden = ("fly_replay_router.affinity", "fly_replay_router.settings", "fly_replay_router.mount")
    for path in (PACKAGE / part).glob("*.py"):
        for imported in _imports(path):
            assert not imported.startswith(forbidden), f"{path.name} imports {imported}"
    if part == "fly":
        for path in (PACKAGE / part).glob("*.py"):
            assert not any(imported.startswith(EDGE) for imported in _imports(path)), path.name


def test_importing_the_edge_loads_no_layer_and_registers_nothing() -> None:
    script = textwrap.dedent(
        """
        import sys
        import fly_replay_router.edge, fly_replay_router.edge.__main__, fly_replay_router.fly
        layer = ("fly_replay_router.affinity", "prometheus_client", "mcp")
        loaded = sorted(m for m in sys.modules if m.startswith(layer))
        print(loaded)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_reading_status_does_not_change_a_machine(tmp_path: Path) -> None:
    """A GET of /_edge/status reports; only the fleet's own loop or a control request notices a crash."""
    fleet = Fleet()
    crashed = subprocess.Popen([sys.executable, "-c", "pass"])
    crashed.wait()
    machine = Machine(id="0badc0ffee0000", url="http://127.0.0.1:9", managed=True, state="started", process=crashed)
    fleet.machines[machine.id] = machine
    document = EdgeStatus().to_json(fleet, app_name="app", region="lcl")
    assert document["machines"][0]["state"] == "started"  # type: ignore[index]
    fleet.refresh()
    assert machine.state == "stopped"
    assert machine.exit_code == 0
