"""Reading a Dockerfile's final CMD and turning it into one local machine's command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fly_replay_router.dockerfile import DockerfileError, parse_image_command, read_image_command
from tests.conftest import ROOT

LAUNCHER = '["python", "-m", "fly_replay_router.serve", "app.main:app", "--port", "8080", "--metrics-port", "9091"]'


def image(*lines: str) -> str:
    return "\n".join(["FROM python:3.11-slim", *lines, ""])


def test_the_repositorys_image_command_keeps_everything_but_ports_app_and_interpreter() -> None:
    command = read_image_command(ROOT / "Dockerfile")
    argv = command.for_machine(port=40001, metrics_port=40002, app="my_server:api")
    assert argv[0] == sys.executable
    expected = [sys.executable, *command.argv[1:]]
    changed = [(index, was, now) for index, (was, now) in enumerate(zip(expected, argv, strict=True)) if was != now]
    assert changed == [
        (3, "app.main:app", "my_server:api"),
        (5, "8080", "40001"),
        (7, "9091", "40002"),
    ]


def test_without_an_app_the_images_app_is_kept() -> None:
    argv = parse_image_command(image(f"CMD {LAUNCHER}")).for_machine(port=1, metrics_port=2)
    assert argv[3] == "app.main:app"


def test_an_app_is_inserted_after_the_module_when_the_cmd_relies_on_the_default() -> None:
    command = parse_image_command(image('CMD ["python3", "-m", "fly_replay_router.serve", "--port=8080"]'))
    assert command.app is None
    assert command.port == 8080
    assert command.for_machine(port=9000, app="x.y:z", python="/venv/bin/python") == [
        "/venv/bin/python",
        "-m",
        "fly_replay_router.serve",
        "x.y:z",
        "--port=9000",
    ]


def test_a_script_installed_next_to_the_interpreter_runs_from_there(tmp_path: Path) -> None:
    (tmp_path / "python").touch()
    (tmp_path / "uvicorn").touch()
    command = parse_image_command(image('CMD ["uvicorn", "app.main:app", "--host", "::", "--port", "8080"]'))
    assert command.for_machine(port=1, python=str(tmp_path / "python"))[0] == str(tmp_path / "uvicorn")


def test_a_program_the_interpreter_cannot_run_is_refused_with_the_fix(tmp_path: Path) -> None:
    command = parse_image_command(image('CMD ["/usr/sbin/nginx", "--port", "8080"]'))
    with pytest.raises(DockerfileError, match=r"neither python nor a script.*\[\"python\", \"-m\""):
        command.for_machine(port=1, python=str(tmp_path / "python"))


@pytest.mark.parametrize(
    "cmd",
    [
        "CMD python -m fly_replay_router.serve --port 8080",
        "CMD [python, -m, fly_replay_router.serve]",  # not JSON: Docker runs it in a shell
        "CMD []",
    ],
)
def test_the_shell_form_is_refused_because_sigterm_would_reach_the_shell(cmd: str) -> None:
    with pytest.raises(DockerfileError, match=r"shell form .*JSON array.*SIGTERM"):
        parse_image_command(image(cmd))


def test_the_final_stage_decides_and_inherits_from_the_stage_it_is_built_from() -> None:
    text = "\n".join(
        [
            "FROM python:3.11 AS build",
            'CMD ["python", "-m", "build_only", "--port", "1"]',
            "FROM python:3.11-slim AS runtime",
            f"CMD {LAUNCHER}",
            "FROM runtime",
            "USER mcp",
        ]
    )
    assert parse_image_command(text).argv[2] == "fly_replay_router.serve"
    with pytest.raises(DockerfileError, match="final stage has no CMD"):
        parse_image_command(f"FROM python:3.11 AS build\nCMD {LAUNCHER}\nFROM python:3.11-slim\n")


def test_continuations_comments_here_documents_and_the_escape_directive() -> None:
    text = "\n".join(
        [
            "# escape=`",
            "FROM python:3.11-slim",
            'CMD ["python", "-m", "fly_replay_router.serve", `',
            "# a comment inside the instruction",
            '    "--port", "8080"]',
            "COPY <<-'EOF' /srv/notes.txt",
            'CMD ["python", "-m", "inside_a_here_document", "--port", "1"]',
            "EOF",
        ]
    )
    assert parse_image_command(text).argv == ("python", "-m", "fly_replay_router.serve", "--port", "8080")


def test_an_entrypoint_is_refused() -> None:
    with pytest.raises(DockerfileError, match="ENTRYPOINT"):
        parse_image_command(image('ENTRYPOINT ["tini", "--"]', f"CMD {LAUNCHER}"))


def test_ports_are_required_where_machines_would_collide() -> None:
    command = parse_image_command(image(f"CMD {LAUNCHER}"))
    assert (command.port, command.metrics_port) == (8080, 9091)
    with pytest.raises(DockerfileError, match="its own metrics_port"):
        command.for_machine(port=1)
    plain = parse_image_command(image('CMD ["python", "-m", "fly_replay_router.serve", "--port", "8080"]'))
    assert plain.metrics_port is None
    with pytest.raises(DockerfileError, match="no --metrics-port"):
        plain.for_machine(port=1, metrics_port=2)
    with pytest.raises(DockerfileError, match="names no --port"):
        parse_image_command(image('CMD ["python", "-m", "fly_replay_router.serve"]')).for_machine(port=1)
    with pytest.raises(DockerfileError, match="not a TCP port"):
        _ = parse_image_command(image('CMD ["python", "-m", "x", "--port", "http"]')).port
