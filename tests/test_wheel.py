"""The built wheel in a FastAPI project laid out as FastAPI's "Bigger Applications" tutorial.

Such a project has its own ``app/`` package (``app/main.py``, ``app/routers/``, ...). Installing
the wheel must leave it alone: the project's ``app`` is the one imported, the library comes in as
``fly_replay_router``, and the project serves the layer from its own ``app.main``.
Reference: https://fastapi.tiangolo.com/tutorial/bigger-applications/
"""

from __future__ import annotations

import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.compat.envs import MCP2, build_wheel, clean_env, exclusive, install_wheel, prepared, run
from tests.conftest import free_port
from tests.mcp_http import INITIALIZE, JSON_AND_SSE, session_headers, tool_call, tool_text

MACHINE = "c0ffee00c0ffee"
TUTORIAL = {
    "app/__init__.py": "",
    "app/dependencies.py": """
        async def get_token_header() -> None:
            return None
    """,
    "app/routers/__init__.py": "",
    "app/routers/items.py": """
        from fastapi import APIRouter

        router = APIRouter(prefix="/items", tags=["items"])


        @router.get("/")
        async def read_items() -> dict[str, str]:
            return {"plumbus": "from the user's own app package"}
    """,
    "app/main.py": """
        from fastapi import FastAPI
        from mcp.server.mcpserver import MCPServer

        from app.routers import items
        from fly_replay_router import load_settings, transport_security, wrap_mcp_app

        settings = load_settings()
        assistant = MCPServer("assistant")


        @assistant.tool()
        def echo(text: str) -> str:
            return text


        mcp_app = wrap_mcp_app(
            assistant.streamable_http_app(streamable_http_path="/mcp", transport_security=transport_security(settings)),
            settings=settings,
        )
        app = FastAPI(lifespan=mcp_app.lifespan)
        app.include_router(items.router)
        app.mount("/assistant", mcp_app)
    """,
}


@pytest.fixture(scope="module")
def tutorial_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    project = prepared(MCP2)
    wheel = build_wheel(tmp_path_factory.mktemp("wheel"))
    with exclusive(project):  # the compatibility matrix installs the edge extra into the same project
        install_wheel(project, wheel, extras="metrics")
        folder = tmp_path_factory.mktemp("bigger-applications")
        for name, text in TUTORIAL.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(textwrap.dedent(text).lstrip())
        yield folder


def test_the_wheel_installs_no_app_package(tutorial_project: Path) -> None:
    where = run(
        [
            str(MCP2.python),
            "-c",
            "import importlib.util as u; print(u.find_spec('app')); print(u.find_spec('fly_replay_router').origin)",
        ],
        cwd="/",
        env=clean_env(),
    ).splitlines()
    assert where[0] == "None", "the wheel installed a top-level package named app"
    assert "site-packages/fly_replay_router/__init__.py" in where[1]
    assert (Path(where[1]).parent / "py.typed").exists()
    # In the project, `app` is the project's own package.
    mine = run(
        [str(MCP2.python), "-c", "import app.main, app.routers.items; print(app.__file__)"],
        cwd=tutorial_project,
        env=clean_env(),
    )
    assert mine.strip() == str(tutorial_project / "app" / "__init__.py")


def test_the_project_serves_its_routes_and_the_layer(tutorial_project: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {**clean_env(), "FLY_MACHINE_ID": MACHINE, "FLY_APP_NAME": "tutorial"}
    log = tmp_path / "uvicorn.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            [str(MCP2.python), "-m", "uvicorn", "app.main:app", "--port", str(port)],
            cwd=tutorial_project, env=env, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 20
            while True:
                assert server.poll() is None, log.read_text()
                try:
                    items = httpx.get(f"{url}/items/", timeout=1)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.05)
            assert items.json() == {"plumbus": "from the user's own app package"}

            initialize = httpx.post(f"{url}/assistant/mcp", headers=JSON_AND_SSE, json=INITIALIZE, timeout=10)
            token = initialize.headers["mcp-session-id"]
            assert token.startswith(f"{MACHINE}.")
            called = httpx.post(
                f"{url}/assistant/mcp",
                headers=session_headers(token),
                json=tool_call("echo", {"text": "hi"}),
                timeout=10,
            )
            assert called.status_code == 200
            assert tool_text(called) == "hi"
            forged = httpx.post(
                f"{url}/assistant/mcp",
                headers=session_headers(token[:-2] + "AA"),
                json=tool_call("echo", {"text": "x"}),
            )
            assert forged.status_code == 404
        finally:
            server.terminate()
            server.wait(10)


def test_on_fly_without_a_secret_it_stops_with_one_sentence(tutorial_project: Path) -> None:
    env = {**clean_env(), "FLY_MACHINE_ID": MACHINE}
    env.pop("AFFINITY_SECRET")
    result = subprocess.run(
        [str(MCP2.python), "-m", "uvicorn", "app.main:app", "--port", str(free_port())],
        cwd=tutorial_project, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "fly-replay-router cannot start: AFFINITY_SECRET is not set" in result.stderr
    assert "fly secrets set AFFINITY_SECRET" in result.stderr
