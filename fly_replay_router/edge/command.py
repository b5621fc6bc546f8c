"""Which command a managed machine runs: the image's own ``CMD``, or the launcher when there is no Dockerfile.

What the local fleet starts should be what Fly starts: the final stage's ``CMD`` of the Dockerfile
next to the fly.toml in use (or ``--dockerfile``), read by ``fly_replay_router.dockerfile`` with
only the port, the metrics port and the app replaced, since several machines share one host. A
project without a Dockerfile (the library installed into someone's app) gets the launcher the
image would use, ``python -m fly_replay_router.serve <app> --port P --metrics-port M``, and the
banner says so. Reference: Dockerfile reference, ``CMD`` (https://docs.docker.com/reference/dockerfile/#cmd).
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from fly_replay_router.dockerfile import WORKERS_OPTION, ImageCommand, read_image_command

DOCKERFILE = "Dockerfile"
# The launcher's graceful-shutdown timeout when no Dockerfile gives one (the demo image uses 25 s).
FALLBACK_GRACEFUL_SECONDS = 25


@dataclass(frozen=True, slots=True)
class MachineCommand:
    """How to build one machine's argv, and where that command came from (for the banner).

    ``image`` is the Dockerfile's command, or None for the launcher fallback.
    """

    image: ImageCommand | None = None
    source: str = "no Dockerfile: python -m fly_replay_router.serve"

    @classmethod
    def find(cls, dockerfile: Path | None, fly_toml: Path, *, required: bool = False) -> MachineCommand:
        """The command for ``dockerfile``, else ``Dockerfile`` beside ``fly_toml``, else the launcher.

        ``required`` (an explicit ``--dockerfile``): a missing file is an error rather than the fallback.
        Raises ``ValueError`` (``DockerfileError``) when the Dockerfile's command cannot run locally.
        """
        path = dockerfile if dockerfile is not None else fly_toml.parent / DOCKERFILE
        if not path.is_file():
            if required:
                raise ValueError(f"{path}: no such file (give --dockerfile the Dockerfile your image is built from)")
            return cls(None, f"no Dockerfile at {path}: python -m fly_replay_router.serve (the launcher)")
        try:
            image = read_image_command(path)
        except OSError as exc:
            raise ValueError(f"{path}: cannot read it ({exc.strerror})") from exc
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        image.port  # noqa: B018  # a CMD without --port is reported now, not when the first machine starts
        return cls(image, f"{path} CMD, ports and app replaced")

    @property
    def serves_metrics(self) -> bool:
        """Whether each machine needs a metrics port of its own."""
        if self.image is not None:
            return self.image.metrics_port is not None
        # The launcher serves metrics only with prometheus-client (the [metrics] extra) installed.
        return importlib.util.find_spec("prometheus_client") is not None

    @property
    def image_workers(self) -> int | None:
        """The ``--workers`` the Dockerfile's ``CMD`` fixes, or None (the launcher runs one per CPU)."""
        argv = self.image.argv if self.image is not None else ()
        value = None
        for index, argument in enumerate(argv):
            if argument == WORKERS_OPTION and index + 1 < len(argv):
                value = argv[index + 1]
            elif argument.startswith(f"{WORKERS_OPTION}="):
                value = argument.partition("=")[2]
        if value is None:
            return None
        if not value.isdigit() or not 1 <= int(value) <= 256:
            raise ValueError(f"the Dockerfile's CMD gives {WORKERS_OPTION} {value!r}: it must be from 1 to 256")
        return int(value)

    def argv(
        self, *, app: str, app_dir: str | None, port: int, metrics_port: int | None, workers: int = 1
    ) -> list[str]:
        """The command line of one machine listening on ``port`` (and ``metrics_port``), ``workers`` processes."""
        if self.image is not None:
            argv = self.image.for_machine(port=port, metrics_port=metrics_port, app=app, workers=workers)
        else:
            argv = [
                sys.executable,
                "-m",
                "fly_replay_router.serve",
                app,
                "--port",
                str(port),
                "--workers",
                str(workers),
            ]
            argv += ["--timeout-graceful-shutdown", str(FALLBACK_GRACEFUL_SECONDS)]
            if metrics_port is not None:
                argv += ["--metrics-port", str(metrics_port)]
        if app_dir is not None:
            argv += ["--app-dir", app_dir]
        return argv
