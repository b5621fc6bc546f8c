"""The docs' reference tables, checked against their one home in the code.

Each check derives the truth from the code (the edge's argument parser, ``AffinitySettings``, the
reasons the layer's modules can give, a real scrape of a machine's metrics port), so a new option,
setting, reason or metric fails here until its row is added, and the message names the row.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
from pathlib import Path

from fly_replay_router.edge.arguments import build_parser
from fly_replay_router.settings import AffinitySettings
from tests.conftest import ROOT
from tests.test_docs_markdown import Table, code_spans, table_under

DOCS = ROOT / "docs"
OPTIONS = (DOCS / "local-fleet.md", "Options", "option")
SETTINGS = (DOCS / "deploy.md", "Settings", "variable")
REASONS = (DOCS / "operate.md", "Rejection reasons", "reason")
# A machine of an app on Fly: the variables the probes add to it, and whose fields they change.
BASE_ENV = {"FLY_MACHINE_ID": "d0c5d0c5d0c5d0", "AFFINITY_SECRET": "docs-probe-secret-0001"}


def where(table: Table, index: int | None = None) -> str:
    line = table.line if index is None else table.row_lines[index]
    return f"{table.page.relative_to(ROOT)}:{line} ({table.section} table)"


# --- the edge's options ------------------------------------------------------------------------


def parser_options() -> dict[str, argparse.Action]:
    """The edge's own options by their long name (the verbs' sub-commands are not options)."""
    options: dict[str, argparse.Action] = {}
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            continue
        long_names = [name for name in action.option_strings if name.startswith("--")]
        if long_names:
            options[long_names[0]] = action
    return options


def row_options(cell: str) -> list[str]:
    return [match for span in code_spans(cell) for match in re.findall(r"--[a-z][a-z-]*", span)]


def shown_default(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_every_edge_option_has_a_row_and_every_row_is_an_option() -> None:
    table = table_under(*OPTIONS)
    documented = {option: index for index, row in enumerate(table.rows) for option in row_options(row["option"])}
    options = parser_options()
    missing = sorted(set(options) - set(documented))
    assert not missing, f"{where(table)}: no row for the edge option(s) {', '.join(missing)}: add e.g. " + " ; ".join(
        f"| `{name}` | {shown_default(options[name].default) if options[name].default else ''} | {options[name].help} |"
        for name in missing
    )
    unknown = sorted(set(documented) - set(options))
    assert not unknown, "; ".join(
        f"{where(table, documented[name])}: row names {name}, which fly-replay-edge does not take" for name in unknown
    )


def test_each_edge_option_row_shows_the_parsers_default() -> None:
    table = table_under(*OPTIONS)
    options = parser_options()
    wrong = []
    for index, row in enumerate(table.rows):
        shown = code_spans(row["default"])
        for name in row_options(row["option"]):
            default = options[name].default if name in options else None
            if default in (None, False, [], ""):
                continue  # computed at start (fly.toml, the Dockerfile) or off: the row says how, in words
            if shown_default(default) not in shown:
                wrong.append(
                    f"{where(table, index)}: {name} defaults to {shown_default(default)}, the row shows {shown}"
                )
    assert not wrong, "\n".join(wrong)


# --- the settings ------------------------------------------------------------------------------

# Values a probe tries for a field of each type, until one is valid and changes the field.
CANDIDATES = {
    "str": ["e0e0e0e0e0e0e0", "cached", "/tmp/docs-probe", "http://{machine_id}.probe:1", "probe"],
    "float": ["7", "off"],
    "int": ["7", "off"],
    "bool": ["1", "true", "on", "0", "false", "off"],
    "tuple[str, ...]": ["probe.example.com", "docs-probe-secret-0002,docs-probe-secret-0003"],
    "tuple[tuple[str, str], ...]": ["e0e0e0e0e0e0e0=http://probe:1"],
}


def field_kind(annotation: str) -> str:
    base = annotation.replace(" | None", "")
    return "str" if base == "Failover" else base


def settings_rows() -> tuple[Table, dict[str, int]]:
    table = table_under(*SETTINGS)
    by_field: dict[str, int] = {}
    for index, row in enumerate(table.rows):
        (name, *_) = code_spans(row["field"]) or [row["field"]]
        assert name not in by_field, f"{where(table, index)}: a second row for field {name}"
        by_field[name] = index
    return table, by_field


def env_variable(table: Table, index: int) -> str:
    spans = code_spans(table.rows[index]["variable"])
    assert spans, f"{where(table, index)}: the variable cell names no `VARIABLE`"
    return spans[0]


def test_every_setting_field_has_one_row_and_every_row_is_a_field() -> None:
    table, by_field = settings_rows()
    fields = {item.name: item for item in dataclasses.fields(AffinitySettings)}
    missing = sorted(set(fields) - set(by_field))
    assert not missing, f"{where(table)}: no row for AffinitySettings field(s) " + ", ".join(
        f"`{name}` (add | `AFFINITY_{name.upper()}` | `{name}` | `{fields[name].default}` | ... |)" for name in missing
    )
    unknown = sorted(set(by_field) - set(fields))
    assert not unknown, "; ".join(
        f"{where(table, by_field[name])}: `{name}` is not a field of AffinitySettings" for name in unknown
    )


def test_each_settings_variable_sets_its_field() -> None:
    table, by_field = settings_rows()
    baseline = AffinitySettings.from_env(BASE_ENV)
    annotations = {item.name: str(item.type) for item in dataclasses.fields(AffinitySettings)}
    wrong = []
    for name, index in by_field.items():
        variable = env_variable(table, index)
        tried = []
        for value in CANDIDATES.get(field_kind(annotations.get(name, "str")), CANDIDATES["str"]):
            try:
                probed = AffinitySettings.from_env({**BASE_ENV, variable: value})
            except ValueError:
                tried.append(f"{value} (refused)")
                continue
            if getattr(probed, name) != getattr(baseline, name):
                break
            tried.append(f"{value} (no change)")
        else:
            wrong.append(f"{where(table, index)}: {variable} does not set field `{name}` (tried {', '.join(tried)})")
    assert not wrong, "\n".join(wrong)


def test_every_variable_settings_reads_is_in_the_table() -> None:
    table, _ = settings_rows()
    source = (ROOT / "fly_replay_router" / "settings.py").read_text()
    read = set(re.findall(r"\b(?:AFFINITY|FLY)_[A-Z_]*[A-Z]\b|\bWEB_CONCURRENCY\b", source))
    named = {span for row in table.rows for cell in row.values() for span in code_spans(cell)}
    named |= {word for row in table.rows for cell in row.values() for word in re.findall(r"[A-Z][A-Z_]+", cell)}
    missing = sorted(read - named)
    assert not missing, f"{where(table)}: settings.py reads {', '.join(missing)}, which no row names"


def test_each_settings_default_is_what_from_env_gives() -> None:
    table, by_field = settings_rows()
    baseline = AffinitySettings.from_env(BASE_ENV)
    wrong = []
    for name, index in by_field.items():
        if not hasattr(baseline, name):
            continue  # reported by the field test
        cell = table.rows[index]["default"]
        variable = env_variable(table, index)
        default = getattr(baseline, name)
        if cell.startswith("none"):
            if default not in (None, (), ""):
                wrong.append(f"{where(table, index)}: the row says none, from_env gives {name}={default!r}")
        elif cell.startswith("`"):
            shown = code_spans(cell)[0]
            try:
                parsed = getattr(AffinitySettings.from_env({**BASE_ENV, variable: shown}), name)
            except ValueError as exc:
                wrong.append(f"{where(table, index)}: the default shown, {variable}={shown}, is refused: {exc}")
                continue
            if parsed != default:
                wrong.append(f"{where(table, index)}: the row shows {shown} ({parsed!r}), from_env gives {default!r}")
        # Otherwise the default is derived (from Fly's environment, another setting) and the row says how.
    assert not wrong, "\n".join(wrong)


def test_every_setting_is_documented_in_the_class_docstring() -> None:
    doc = AffinitySettings.__doc__ or ""
    missing = [item.name for item in dataclasses.fields(AffinitySettings) if f"``{item.name}``" not in doc]
    assert not missing, f"AffinitySettings' docstring has no ``{'``, ``'.join(missing)}`` bullet: the help lives there"


# --- the rejection reasons ---------------------------------------------------------------------

# Where the layer's code names a reason: the classes and helpers that carry one.
_REASON_CALLS = {"Reject": 0, "InvalidToken": 0, "ForwardOutcome": 1, "_reject": 1, "_record": 2}


def reasons_in_code() -> dict[str, str]:
    """Every reason string the layer's modules can give, with the first place each is given."""
    found: dict[str, str] = {}

    def note(node: ast.AST, path: Path) -> None:
        for inner in ast.walk(node):
            if isinstance(inner, ast.Constant) and isinstance(inner.value, str) and inner.value:
                found.setdefault(inner.value, f"{path.relative_to(ROOT)}:{inner.lineno}")

    for path in sorted((ROOT / "fly_replay_router" / "affinity").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                position = _REASON_CALLS.get(name)
                if position is not None and len(node.args) > position:
                    note(node.args[position], path)
                for keyword in node.keywords:
                    if keyword.arg == "reason":
                        note(keyword.value, path)
            elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(getattr(target, "id", getattr(target, "attr", "")) == "reason" for target in targets):
                    note(node.value, path)
    return found


def test_the_reason_scan_finds_the_decisions_own_reasons() -> None:
    # The scan itself: the decision's documented codes (decision.py's docstring) must be among what it finds.
    found = reasons_in_code()
    assert {"owner_unreachable", "already_replayed", "bad_signature", "owner_busy", "rate_limited"} <= set(found)


def test_every_rejection_reason_has_a_row_and_every_row_is_a_reason() -> None:
    table = table_under(*REASONS)
    documented = {code_spans(row["reason"])[0]: index for index, row in enumerate(table.rows)}
    found = reasons_in_code()
    missing = sorted(set(found) - set(documented))
    assert not missing, f"{where(table)}: no row for the reason(s) " + ", ".join(
        f"`{reason}` (given at {found[reason]})" for reason in missing
    )
    # A row the scan did not see may still name a reason given some other way: it must at least be a
    # string the layer's code holds.
    literals = {
        node.value
        for path in (ROOT / "fly_replay_router" / "affinity").glob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    unknown = sorted(set(documented) - set(found) - literals)
    assert not unknown, "; ".join(
        f"{where(table, documented[reason])}: `{reason}` is given nowhere in fly_replay_router/affinity/"
        for reason in unknown
    )


# --- the metrics -------------------------------------------------------------------------------


# The metrics table of docs/operate.md is checked against a real scrape, both ways, by
# tests/test_metrics_dashboard.py (with the dashboard's queries).
