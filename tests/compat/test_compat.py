"""Each SDK a user may have, with the built wheel installed beside it, through the local fleet.

Per entry: the SDK's version is the one the user installed (installing this library moved
nothing), and 10 sessions x 5 calls of that SDK's own client, through ``fly-replay-edge`` with two
machines and random balancing, each stay on one machine with their count going 1, 2, 3 ... Every
client reports the machine that served each call (a ``whoami`` tool, or for the README's example a
response header added around it), and it is the machine the session's token names.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from fly_replay_router.protocol import owner_of
from tests.compat.envs import (
    FASTMCP,
    MCP1,
    MCP2,
    ROOT,
    UserProject,
    build_wheel,
    clean_env,
    exclusive,
    install_wheel,
    installed_version,
    prepared,
    run,
)

HERE = Path(__file__).resolve().parent
SESSIONS, CALLS = 10, 5


@dataclass(frozen=True)
class Entry:
    project: UserProject
    app: str  # module:attr, imported from the app directory
    mcp_path: str
    client: list[str]  # the client script and its transport arguments (URL, sessions, calls follow)
    counts_per_session: bool = True  # False: the tool counts per machine (the README's example)


ENTRIES = {
    "mcp1-streamable": Entry(MCP1, "mcp1_notes:api", "/notes/mcp", ["mcp1_client.py", "{url}", "streamable"]),
    "mcp1-sse": Entry(MCP1, "mcp1_notes:api", "/legacy/sse", ["mcp1_client.py", "{url}", "sse"]),
    "mcp2-readme": Entry(
        MCP2, "readme_served_by:api", "/notes/mcp", ["mcp2_client.py", "{url}"], counts_per_session=False
    ),
    "fastmcp": Entry(FASTMCP, "fastmcp_notes:api", "/notes/mcp", ["fastmcp_client.py", "{url}"]),
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def readme_example() -> str:
    section = (ROOT / "README.md").read_text().split("## Add it to your MCP server", 1)[1]
    match = re.search(r"```python[^\n]*\n(.*?)```", section, re.DOTALL)
    assert match, "the README's mount section has no python block"
    return match.group(1)


# The README's example has no tool that names its machine: this pure ASGI wrapper, beside the example
# (which stays verbatim), adds the machine's id to every response so that the client can report it.
README_SERVED_BY = """import os

from my_server import api as readme_api

MACHINE = os.environ["FLY_MACHINE_ID"].encode()


async def api(scope, receive, send):
    if scope["type"] != "http":
        return await readme_api(scope, receive, send)

    async def named(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"x-served-by", MACHINE)]}
        await send(message)

    await readme_api(scope, receive, named)
"""


@contextmanager
def fleet(project: UserProject, app: str, app_dir: Path, mcp_path: str, log: Path) -> Iterator[str]:
    """``fly-replay-edge`` from the project's environment, two machines of ``app``; yields the edge URL."""
    command = [str(project.script("fly-replay-edge")), "--machines", "2", "--port", "0", "--app", app]
    command += ["--app-dir", str(app_dir), "--mcp-path", mcp_path]
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=app_dir, stdout=output, stderr=subprocess.STDOUT, env=clean_env())
        try:
            deadline = time.monotonic() + 90
            while not (match := re.search(r"^edge: +(http://\S+)", log.read_text(errors="replace"), re.M)):
                assert process.poll() is None, f"the edge exited:\n{log.read_text(errors='replace')}"
                assert time.monotonic() < deadline, f"the edge never became ready:\n{log.read_text(errors='replace')}"
                time.sleep(0.1)
            yield match.group(1)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                assert process.wait(30) == 0, log.read_text(errors="replace")
            finally:
                if process.poll() is None:
                    process.kill()


def edge_status(url: str) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(f"{url}/_edge/status", timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", list(ENTRIES))
def test_sessions_stick_with_the_users_own_sdk(name: str, wheel: Path, tmp_path: Path) -> None:
    entry = ENTRIES[name]
    project = prepared(entry.project)
    with exclusive(project):  # another test may install a build with other extras into it
        sdk_before = installed_version(project, project.sdk)
        assert sdk_before is not None
        install_wheel(project, wheel)
        assert installed_version(project, project.sdk) == sdk_before, "installing the wheel changed the user's SDK"

        app_dir = HERE / "apps"
        if entry.app.startswith("readme_served_by:"):
            app_dir = tmp_path / "project"
            app_dir.mkdir()
            (app_dir / "my_server.py").write_text(readme_example())
            (app_dir / "readme_served_by.py").write_text(README_SERVED_BY)
        with fleet(project, entry.app, app_dir, entry.mcp_path, tmp_path / "edge.log") as edge:
            client = [arg.replace("{url}", edge + entry.mcp_path) for arg in entry.client]
            output = run(
                [str(project.python), *client, str(SESSIONS), str(CALLS)], cwd=HERE / "clients", env=clean_env()
            )
            replays = edge_status(edge)["replays"]
            machines = {machine["id"] for machine in edge_status(edge)["machines"]}
    report = json.loads(output.strip().splitlines()[-1])

    assert report["sdk_version"] == sdk_before
    assert len(report["sessions"]) == SESSIONS
    assert len(report["tokens"]) == SESSIONS
    for calls, token in zip(report["sessions"], report["tokens"], strict=True):
        counts = [count for _, count in calls]
        first = 1 if entry.counts_per_session else counts[0]
        assert counts == list(range(first, first + CALLS)), f"a session moved: {calls}"
        assert len({machine for machine, _ in calls}) == 1, f"a session was answered by two machines: {calls}"
        # Every client names the machine that served each call: the one its session token names.
        assert calls[0][0] in machines, f"no machine of the fleet answered: {calls}"
        assert calls[0][0] == owner_of(token), f"served by {calls[0][0]}, the token names {owner_of(token)}"
    # Random balancing over two machines: many requests landed on the wrong one and were replayed.
    assert replays > 0
