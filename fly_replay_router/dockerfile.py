"""The image's own command, read from its Dockerfile, for running machines locally as Fly runs them.

``read_image_command("Dockerfile")`` finds the final stage's ``CMD`` (exec form) and
``ImageCommand.for_machine(port=..., metrics_port=..., app=...)`` returns it with only the port, the
metrics port and (when given) the app ``module:attribute`` replaced, and with its program mapped to
the running interpreter: ``python`` becomes ``sys.executable`` and a script such as ``uvicorn``
the one installed next to it. Several local machines share one host, so each needs its own ports;
everything else (addresses, proxy-header trust, graceful-shutdown timeout) is the image's.

The shell form (``CMD python -m ...``) is refused: Docker runs it as ``/bin/sh -c``, so the shell,
not the server, is the process that gets fly.toml's ``kill_signal``. An ``ENTRYPOINT`` is refused
too: the command would be its arguments, not a command.

Reference: Dockerfile reference, ``CMD``, ``ENTRYPOINT``, parser directives, line continuation and
here-documents (https://docs.docker.com/reference/dockerfile/).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PORT_OPTION = "--port"
METRICS_PORT_OPTION = "--metrics-port"
WORKERS_OPTION = "--workers"
_APP_ARGUMENT = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
_PYTHON = re.compile(r"python(\d+(\.\d+)?)?")
_ESCAPE_DIRECTIVE = re.compile(r"#\s*escape\s*=\s*(\S)\s*", re.IGNORECASE)
_HEREDOC = re.compile(r"<<-?\s*[\"']?(\w+)[\"']?")


class DockerfileError(ValueError):
    """The Dockerfile's command cannot be run as a local machine; the message says why and what to change."""


@dataclass(frozen=True, slots=True)
class ImageCommand:
    """A Dockerfile's final ``CMD`` in exec form, as written."""

    argv: tuple[str, ...]

    @property
    def port(self) -> int:
        """The ``--port`` the image serves on (fly.toml's ``internal_port``)."""
        value = self._option(PORT_OPTION)
        if value is None:
            raise DockerfileError(f"the Dockerfile's CMD names no {PORT_OPTION}: {list(self.argv)}")
        return _port(PORT_OPTION, value[1])

    @property
    def metrics_port(self) -> int | None:
        """The ``--metrics-port`` (fly.toml's ``[metrics] port``), or None when the image serves no metrics."""
        value = self._option(METRICS_PORT_OPTION)
        return None if value is None else _port(METRICS_PORT_OPTION, value[1])

    @property
    def app(self) -> str | None:
        """The app ``module:attribute`` the command names, or None when it relies on a default."""
        index = self._app_index()
        return None if index is None else self.argv[index]

    def for_machine(
        self,
        *,
        port: int,
        metrics_port: int | None = None,
        app: str | None = None,
        workers: int | None = None,
        python: str = sys.executable,
    ) -> list[str]:
        """The command for one local machine: the image's, with its ports (and ``app``) replaced.

        ``metrics_port`` is required when the image serves metrics (machines on one host cannot
        share a port) and refused when it does not. ``workers`` sets ``--workers``: on Fly the
        launcher runs one worker per CPU of the VM, which a local machine must say (fly.toml's cpus).
        """
        self.port  # noqa: B018  # raises the clear error when --port is missing
        if (metrics_port is None) != (self.metrics_port is None):
            if metrics_port is None:
                raise DockerfileError(
                    f"the image serves metrics on port {self.metrics_port}: give each machine its own metrics_port"
                )
            raise DockerfileError(f"the Dockerfile's CMD has no {METRICS_PORT_OPTION} to replace")
        argv = [*self._program(python), *self.argv[1:]]
        _replace_option(argv, PORT_OPTION, str(port))
        if metrics_port is not None:
            _replace_option(argv, METRICS_PORT_OPTION, str(metrics_port))
        if workers is not None:
            if self._option(WORKERS_OPTION) is None:
                argv += [WORKERS_OPTION, str(workers)]
            else:
                _replace_option(argv, WORKERS_OPTION, str(workers))
        if app is not None:
            index = self._app_index()
            if index is not None:
                argv[index] = app
            else:
                argv.insert(argv.index("-m") + 2 if "-m" in argv else 1, app)
        return argv

    def _program(self, python: str) -> list[str]:
        program = self.argv[0]
        name = program.rsplit("/", 1)[-1]
        if _PYTHON.fullmatch(name):
            return [python]
        installed = Path(python).parent / name
        if "/" not in program and installed.is_file():
            return [str(installed)]
        raise DockerfileError(
            f"the Dockerfile's CMD runs {program!r}, which is neither python nor a script installed next to "
            f'{python}; write it as ["python", "-m", ...]'
        )

    def _option(self, name: str) -> tuple[int, str] | None:
        found = None
        for index, argument in enumerate(self.argv):
            if argument == name and index + 1 < len(self.argv):
                found = (index + 1, self.argv[index + 1])
            elif argument.startswith(name + "="):
                found = (index, argument.split("=", 1)[1])
        return found

    def _app_index(self) -> int | None:
        start = self.argv.index("-m") + 2 if "-m" in self.argv else 1
        for index in range(start, len(self.argv)):
            if _APP_ARGUMENT.fullmatch(self.argv[index]):
                return index
        return None


def read_image_command(dockerfile: str | Path) -> ImageCommand:
    """The final stage's ``CMD`` of the Dockerfile at ``dockerfile``."""
    return parse_image_command(Path(dockerfile).read_text(encoding="utf-8"))


def parse_image_command(text: str) -> ImageCommand:
    """The final stage's ``CMD`` of a Dockerfile's text; ``DockerfileError`` if it cannot be run as written."""
    stages: dict[str, tuple[str | None, bool]] = {}
    stage: str | None = None
    command: str | None = None
    entrypoint = False
    for instruction, arguments in _instructions(text):
        if instruction == "FROM":
            words = [word for word in arguments.split() if not word.startswith("--")]
            base = words[0].lower() if words else ""
            stage = words[2].lower() if len(words) >= 3 and words[1].lower() == "as" else None
            # A stage built FROM an earlier stage inherits its CMD and ENTRYPOINT.
            command, entrypoint = stages.get(base, (None, False))
        elif instruction == "CMD":
            command = arguments
        elif instruction == "ENTRYPOINT":
            entrypoint = True
        if stage is not None:
            stages[stage] = (command, entrypoint)
    if command is None:
        raise DockerfileError("the Dockerfile's final stage has no CMD (it would run its base image's command)")
    if entrypoint:
        raise DockerfileError("the Dockerfile has an ENTRYPOINT: give the whole command in CMD instead")
    return ImageCommand(_exec_form(command))


def _exec_form(arguments: str) -> tuple[str, ...]:
    try:
        argv = json.loads(arguments) if arguments.startswith("[") else None
    except json.JSONDecodeError:
        argv = None  # Docker runs a CMD that is not a valid JSON array in the shell form
    if not isinstance(argv, list) or not argv or not all(isinstance(item, str) for item in argv):
        raise DockerfileError(
            f"the Dockerfile's CMD is in shell form ({arguments!r}): write it as a JSON array, "
            '["python", "-m", ...]; in shell form /bin/sh, not the server, receives SIGTERM'
        )
    return tuple(argv)


def _instructions(text: str) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments and here-documents skipped."""
    lines = text.splitlines()
    escape = "\\"
    for line in lines:
        directive = _ESCAPE_DIRECTIVE.fullmatch(line.strip())
        if directive:
            escape = directive.group(1)
        if not line.startswith("#"):
            break
    index = 0
    while index < len(lines):
        logical = ""
        while index < len(lines):
            line = lines[index]
            index += 1
            if line.lstrip().startswith("#"):
                continue  # a comment, also inside a continued instruction
            stripped = line.rstrip()
            if stripped.endswith(escape):
                logical += stripped[: -len(escape)]
                continue
            logical += line
            break
        words = logical.strip().split(None, 1)
        if not words:
            continue
        instruction, arguments = words[0].upper(), (words[1].strip() if len(words) > 1 else "")
        for terminator in _HEREDOC.findall(arguments) if instruction in ("RUN", "COPY", "ADD") else []:
            while index < len(lines) and lines[index].strip() != terminator:
                index += 1
            index += 1
        yield instruction, arguments


def _replace_option(argv: list[str], name: str, value: str) -> None:
    for index, argument in enumerate(argv):
        if argument == name and index + 1 < len(argv):
            argv[index + 1] = value
        elif argument.startswith(name + "="):
            argv[index] = f"{name}={value}"


def _port(name: str, value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise DockerfileError(f"the Dockerfile's CMD gives {name} {value!r}, which is not a TCP port")
    return int(value)
