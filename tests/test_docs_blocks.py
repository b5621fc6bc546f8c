"""Every command and code block of the README and docs/ is run, as a reader would run it.

One test per page: the page's blocks run in order, in a network namespace of their own
(``unshare -rn``: its own loopback, so the commands use the ports they name) and from a scratch
directory holding the checkout. ``docs/testing.md`` ("Docs that cannot rot") is the reader's
account of the rules; in short:

- ``sh``: every line is a command and must exit 0; ``console``: the ``$ `` lines are commands, and
  the labels of the sample output (``edge:``, ``MCP:``) must be in what the command prints;
  ``python``: a program (titled ``NAME.py``: saved under that name first); ``json`` titled
  ``GET /path``: the same fields as the running server's answer there.
- A server (the edge, the launcher, uvicorn, gunicorn, ``mkdocs serve``) is started and stays up for
  the page's next blocks; Ctrl-C (SIGINT to its process group) stops it when a later command takes
  its port or at the page's end, and it must exit and leave no machine behind.
- The set-up line and ``pytest`` commands are checked, not run; a block titled
  ``Not run by the tests: <reason>`` is skipped, and the set of those is kept small.

Run one page by hand: ``unshare -rn --pid --fork --kill-child --mount-proc sh -c 'ip link set lo up &&
.venv/bin/python -m tests.test_docs_blocks docs/getting-started.md'``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT
from tests.test_docs_markdown import NOT_RUN, PAGES, Block, fenced_blocks

BIN = Path(sys.executable).parent
LANGUAGES = {"sh", "console", "python", "json", "text", "toml", "dockerfile"}
# The blocks that say they are not run: a Fly account, a deployed app, runs of minutes, a person at
# the page, the suite itself and the rewriting of its lock. Half of them need Fly.
MAX_NOT_RUN = 17
COMMAND_TIMEOUT = 150.0
READY_TIMEOUT = 90.0
STOP_TIMEOUT = 45.0
# What a start that lost a race for a free port prints.
PORT_CLASHES = ("Address already in use", "--metrics-port must differ from --port")
_SET_UP = re.compile(
    r"^python3 -m venv \.venv && \.venv/bin/pip install -q (?:-c [\w.-]+\.lock )*"
    r'-e "\.\[(?P<extra>[a-z]+)\]"(?: && (?P<rest>.+))?$'
)
_LABEL = re.compile(r"^[A-Za-z][\w.]*:$")


class DocFailure(AssertionError):
    """A block did not do what its page says."""


@dataclass
class Server:
    """A command that serves until stopped, started by a block."""

    command: str
    where: str
    port: int
    process: subprocess.Popen[bytes]
    output: Path
    machine_pids: set[int] = field(default_factory=set)

    def printed(self) -> str:
        return self.output.read_text(errors="replace")


@dataclass
class Reader:
    """One reader going through one page: the scratch checkout, the environment, the servers running."""

    page: Path
    workdir: Path
    env: dict[str, str]
    servers: list[Server] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def note(self, line: str) -> None:
        self.log.append(f"{time.monotonic() - self.started:6.1f}s  {line}")

    # --- blocks --------------------------------------------------------------------------------

    def run_block(self, block: Block) -> None:
        if block.not_run or block.language not in ("sh", "console", "python", "json"):
            return
        if block.language == "python":
            self.run_python(block)
        elif block.language == "json":
            self.compare_json(block)
        elif block.language == "sh":
            for command in sh_commands(block.text):
                self.run_command(block, command, None)
        else:
            for command, sample in console_commands(block.text):
                self.run_command(block, command, sample)

    def run_python(self, block: Block) -> None:
        name = block.title if block.title.endswith(".py") else f"block_{block.line}.py"
        program = self.workdir / name
        program.write_text(block.text)
        self.note(f"{block.where}: python {name}")
        result = subprocess.run(
            [sys.executable, str(program)], cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=60
        )
        if result.returncode != 0:
            raise DocFailure(f"{block.where}: the python block exited {result.returncode}:\n{result.stderr[-3000:]}")

    def compare_json(self, block: Block) -> None:
        method, _, path = block.title.partition(" ")
        if method != "GET" or not path.startswith("/"):
            return  # an example document, not an answer of a running server
        if not self.servers:
            raise DocFailure(f"{block.where}: the block shows {block.title}, but no server of the page is running")
        server = self.servers[-1]
        answer = httpx.get(f"http://127.0.0.1:{server.port}{path}", timeout=10).json()
        differences = compare_fields(json.loads(block.text), answer, "")
        if differences:
            raise DocFailure(f"{block.where}: {block.title} of `{server.command}` differs: " + "; ".join(differences))
        self.note(f"{block.where}: {block.title} has the fields shown")

    # --- commands ------------------------------------------------------------------------------

    def run_command(self, block: Block, command: str, sample: str | None) -> None:
        where = f"{block.where}: `{command}`"
        set_up = _SET_UP.match(command)
        if set_up:
            check_extra_installed(where, set_up.group("extra"))
            self.note(f"{where}: set-up checked (the extra {set_up.group('extra')} is installed)")
            if not set_up.group("rest"):
                return
            command = set_up.group("rest")
        words = shlex.split(command)
        if "pytest" in words:
            check_pytest_command(where, command, words)
            self.note(f"{where}: pytest command checked")
            return
        port = server_port(words)
        if port is not None:
            self.start_server(where, command, port, sample)
            return
        self.note(where)
        result = subprocess.run(
            ["bash", "-c", reader_form(command)],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
        if result.returncode != 0:
            raise DocFailure(
                f"{where} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
                + self.server_logs()
            )
        if sample is not None:
            check_labels(where, sample, result.stdout)

    def start_server(self, where: str, command: str, port: int, sample: str | None, *, retry: bool = True) -> None:
        for running in list(self.servers):
            if running.port == port and running.command == command and running.process.poll() is None:
                self.note(f"{where}: already serving (started at {running.where})")
                if sample is not None:
                    self.wait_for_labels(where, running, sample)
                return
            if running.port == port:
                self.stop(running)
        output = Path(tempfile.mkstemp(prefix="docs-server-", suffix=".log", dir=self.workdir)[1])
        with output.open("wb") as sink:
            process = subprocess.Popen(
                ["bash", "-c", f"exec {reader_form(command)}"],
                cwd=self.workdir,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Server(command, where, port, process, output)
        self.servers.append(server)
        try:
            self.wait_until_ready(server)
        except DocFailure as exc:
            if not retry or not any(clash in str(exc) for clash in PORT_CLASHES):
                raise
            # The edge picks each machine's ports free at that moment, one after another, and can pick one
            # twice; the same start again draws new ones (the tests' own machines retry the same way).
            self.servers.remove(server)
            self.note(f"{where}: started again: a port it picked was taken ({exc})")
            self.start_server(where, command, port, sample, retry=False)
            return
        self.note(f"{where}: serving on port {port}")
        if sample is not None:
            self.wait_for_labels(where, server, sample)

    def wait_until_ready(self, server: Server) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        edge = is_edge(shlex.split(server.command))
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise DocFailure(
                    f"{server.where} exited {server.process.returncode} at start:\n{server.printed()[-3000:]}"
                )
            if edge:
                machines = edge_machines(server.port)
                if machines and all(machine.get("state") == "started" for machine in machines):
                    server.machine_pids = {machine["pid"] for machine in machines if machine.get("pid")}
                    return
            elif port_open(server.port):
                return
            time.sleep(0.1)
        raise DocFailure(f"{server.where} was not ready in {READY_TIMEOUT:g} s:\n{server.printed()[-3000:]}")

    def wait_for_labels(self, where: str, server: Server, sample: str) -> None:
        deadline = time.monotonic() + 15
        while missing_labels(sample, server.printed()) and time.monotonic() < deadline:
            time.sleep(0.1)
        check_labels(where, sample, server.printed())

    def stop(self, server: Server) -> None:
        """Ctrl-C, as in the server's terminal: SIGINT to its process group; it must exit, leaving nothing."""
        self.servers.remove(server)
        if server.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.process.pid, signal.SIGINT)
            try:
                server.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(server.process.pid, signal.SIGKILL)
                server.process.wait()
                raise DocFailure(f"{server.where} did not stop on Ctrl-C in {STOP_TIMEOUT:g} s") from None
        deadline = time.monotonic() + 10
        while (left := [pid for pid in server.machine_pids if alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if left:
            raise DocFailure(f"{server.where}: machine processes {left} were left running after Ctrl-C")
        self.note(f"{server.where}: stopped by Ctrl-C")

    def stop_all(self) -> None:
        failures = []
        for server in list(reversed(self.servers)):
            try:
                self.stop(server)
            except DocFailure as exc:
                failures.append(str(exc))
        if failures:
            raise DocFailure("\n".join(failures))

    def server_logs(self) -> str:
        return "".join(f"\n--- {server.where} printed:\n{server.printed()[-1500:]}" for server in self.servers)


# --- reading commands ----------------------------------------------------------------------------


def sh_commands(text: str) -> list[str]:
    """The commands of an ``sh`` block: one a line (``\\`` continues one), comments dropped."""
    commands: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        pending = ""
        command = strip_comment(line).strip()
        if command:
            commands.append(command)
    return commands


def console_commands(text: str) -> list[tuple[str, str]]:
    """The ``$ `` commands of a ``console`` block, each with the sample output that follows it."""
    found: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            found.append((strip_comment(line[2:]).strip(), []))
        elif found:
            found[-1][1].append(line)
    return [(command, "\n".join(sample)) for command, sample in found]


def strip_comment(line: str) -> str:
    """The line without a trailing ``# comment`` (a ``#`` inside quotes stays)."""
    quote = ""
    for index, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def reader_form(command: str) -> str:
    """The command with ``.venv/bin/`` as the interpreter the tests run under."""
    return command.replace(".venv/bin/", f"{BIN}/")


def program_words(words: list[str]) -> list[str]:
    """The command's words without leading ``NAME=value`` assignments."""
    index = 0
    while index < len(words) and re.match(r"^[A-Z_][A-Z0-9_]*=", words[index]):
        index += 1
    return words[index:]


def is_edge(words: list[str]) -> bool:
    words = program_words(words)
    if not words:
        return False
    if Path(words[0]).name == "fly-replay-edge":
        rest = words[1:]
    elif words[1:3] == ["-m", "fly_replay_router.edge"]:
        rest = words[3:]
    else:
        return False
    return not rest or rest[0] not in ("machine", "worker", "status")


def server_port(words: list[str]) -> int | None:
    """The port a command that serves until stopped listens on; None for a command that ends."""
    words = program_words(words)
    if not words:
        return None
    program = Path(words[0]).name
    serves = (
        is_edge(words)
        or words[1:3] == ["-m", "fly_replay_router.serve"]
        or program in ("uvicorn", "gunicorn")
        or (program == "mkdocs" and words[1:2] == ["serve"])
    )
    if not serves:
        return None
    for index, word in enumerate(words[:-1]):
        if word == "--port":
            return int(words[index + 1])
        if word in ("--bind", "-b", "--dev-addr", "-a"):
            return int(words[index + 1].rsplit(":", 1)[1])
    return 8080 if is_edge(words) or "fly_replay_router.serve" in words else 8000


def check_extra_installed(where: str, extra: str) -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    if extra not in extras:
        raise DocFailure(f"{where}: pyproject.toml has no extra '{extra}'")
    for requirement in extras[extra]:
        name = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0]
        if name == "fly-replay-router":
            continue
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise DocFailure(f"{where}: {requirement} of the extra '{extra}' is not installed") from None


def check_pytest_command(where: str, command: str, words: list[str]) -> None:
    paths = [word.split("::")[0] for word in words if word.startswith("tests")]
    missing = [path for path in paths if not (ROOT / path).exists()]
    if missing:
        raise DocFailure(f"{where}: names {', '.join(missing)}, which does not exist")
    if not paths and "-k" not in words:
        ci = (ROOT / ".ci" / "run").read_text().split("&&")[-1].strip().removesuffix(' "$@"')
        if command.strip() != ci:
            raise DocFailure(f"{where}: the whole suite is what .ci/run runs, `{ci}`")


def labels(text: str) -> list[str]:
    return [words[0] for line in text.splitlines() if (words := line.split()) and _LABEL.match(words[0])]


def missing_labels(sample: str, printed: str) -> list[str]:
    seen = set(labels(printed))
    return [label for label in labels(sample) if label not in seen]


def check_labels(where: str, sample: str, printed: str) -> None:
    missing = missing_labels(sample, printed)
    if missing:
        raise DocFailure(
            f"{where}: the page shows lines {', '.join(missing)} that it no longer prints:\n{printed[-3000:]}"
        )


def compare_fields(shown: Any, real: Any, path: str) -> list[str]:
    """Where the shown JSON and the real answer have different fields (values are examples)."""
    if isinstance(shown, dict) and isinstance(real, dict):
        if shown and not any(re.fullmatch(r"[a-z_]+", key) for key in shown):
            return []  # a map keyed by codes (counts per error code): its keys are examples
        differences = [f"{path or '.'} has no field {key!r}" for key in shown if key not in real]
        differences += [f"{path or '.'} has a field {key!r} the page does not show" for key in real if key not in shown]
        for key in shown.keys() & real.keys():
            differences += compare_fields(shown[key], real[key], f"{path}.{key}")
        return differences
    if isinstance(shown, list) and isinstance(real, list) and shown and real:
        return compare_fields(shown[0], real[0], f"{path}[0]")
    return []


def edge_machines(port: int) -> list[dict[str, Any]]:
    try:
        status = httpx.get(f"http://127.0.0.1:{port}/_edge/status", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return []
    machines = status.get("machines", [])
    return machines if isinstance(machines, list) else []


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False  # exited, waiting for its parent to collect it
    return True


def scratch_checkout(into: Path) -> Path:
    """A directory that holds the checkout (links to its top-level entries): files a block writes stay here."""
    for entry in ROOT.iterdir():
        if entry.name not in (".git",):
            (into / entry.name).symlink_to(entry)
    return into


def reader_env(workdir: Path) -> dict[str, str]:
    """A reader's shell: no Fly or affinity variables of this test run; the checkout's tools on PATH."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("FLY_", "AFFINITY_", "PYTEST_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(workdir)
    env["NO_MKDOCS_2_WARNING"] = "1"
    return env


def read_page(page: Path) -> int:
    """Run every block of ``page`` (inside the page's own network namespace); 0 if all did what the page says."""
    with tempfile.TemporaryDirectory(prefix="docs-reader-") as scratch:
        workdir = scratch_checkout(Path(scratch))
        reader = Reader(page, workdir, reader_env(workdir))
        try:
            for block in fenced_blocks(page):
                reader.run_block(block)
            reader.stop_all()
        except (DocFailure, subprocess.TimeoutExpired) as exc:
            print("\n".join(reader.log), file=sys.stderr)
            print(f"{reader.server_logs()}\n\nFAILED: {exc}", file=sys.stderr)
            with contextlib.suppress(DocFailure):
                reader.stop_all()
            return 1
        print("\n".join(reader.log))
        return 0


# --- the tests -----------------------------------------------------------------------------------


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def runnable(page: Path) -> bool:
    return any(
        not block.not_run and block.language in ("sh", "console", "python", "json") for block in fenced_blocks(page)
    )


@pytest.mark.parametrize("page", [page for page in PAGES if runnable(page)], ids=page_id)
def test_every_block_of_the_page_does_what_the_page_says(page: Path) -> None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.fail("the doc blocks run in a network namespace of their own: install util-linux and iproute2")
    # Its own network (the ports the page names are free) and its own PID namespace (killed with it, so
    # nothing a page started outlives a failed or timed-out run).
    command = [
        "unshare",
        "-rn",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "sh",
        "-c",
        'ip link set lo up && "$0" -m tests.test_docs_blocks "$1"',
        sys.executable,
        str(page),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, f"{page_id(page)}:\n{result.stdout[-2000:]}{result.stderr[-8000:]}"


def test_every_block_says_what_it_is() -> None:
    unknown = [
        f"{block.where} ({block.language or 'no language'})"
        for page in PAGES
        for block in fenced_blocks(page)
        if block.language not in LANGUAGES
    ]
    assert unknown == [], f"give these blocks one of {sorted(LANGUAGES)}: {unknown}"


def test_the_blocks_not_run_say_why_and_are_few() -> None:
    skipped = [block for page in PAGES for block in fenced_blocks(page) if block.not_run]
    without_reason = [block.where for block in skipped if not block.title.removeprefix(NOT_RUN).strip()]
    assert without_reason == [], f"'{NOT_RUN}' needs a reason after it: {without_reason}"
    assert len(skipped) <= MAX_NOT_RUN, "blocks not run: " + ", ".join(f"{b.where} ({b.title})" for b in skipped)


def test_the_readers_rules_hold_on_small_pages(tmp_path: Path) -> None:
    # The rules themselves: a failing command, a renamed banner label and a wrong field must each be caught.
    assert sh_commands("echo a  # why\n\n# note\nprintf '%s' \\\n  b\n") == ["echo a", "printf '%s'   b"]
    assert console_commands("$ run --x  # c\nedge: 1\nother\n$ two\n") == [("run --x", "edge: 1\nother"), ("two", "")]
    assert missing_labels("edge:     x\nMCP:   y\nsession 1: z\n", "edge: a\nMCP: b\n") == []
    assert missing_labels("edge:     x\npage: y\n", "edge: a\n") == ["page:"]
    assert server_port(shlex.split(".venv/bin/fly-replay-edge --app my:api")) == 8080
    assert server_port(shlex.split("X=1 .venv/bin/python -m fly_replay_router.edge status")) is None
    assert server_port(shlex.split("gunicorn a:b --bind 0.0.0.0:8081")) == 8081
    assert server_port(shlex.split(".venv/bin/python -m fly_replay_router.client")) is None
    assert (
        compare_fields({"a": 1, "m": [{"b": 2}], "errors": {"PA01": 1}}, {"a": 2, "m": [{"b": 3}], "errors": {}}, "")
        == []
    )
    assert compare_fields({"a": 1}, {"a": 1, "c": 2}, "") == [". has a field 'c' the page does not show"]
    page = tmp_path / "page.md"
    page.write_text("# P\n\n```sh\ntrue\nfalse\n```\n")
    assert read_page(page) == 1


if __name__ == "__main__":
    sys.exit(read_page(Path(sys.argv[1]).resolve()))
