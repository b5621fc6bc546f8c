"""A machine's size from fly.toml's ``[[vm]]`` section: its CPUs and its memory.

Fly gives every Machine of the app the size ``[[vm]]`` names: ``size`` (a preset such as
``shared-cpu-2x``), ``cpus``, ``memory`` (``"512mb"``, ``"1gb"``, or a number of MB) or the older
``memory_mb``; the explicit keys win over the preset. With no ``[[vm]]`` the size is Fly's default
preset, ``shared-cpu-1x`` (one CPU, 256 MB). A preset's memory is Fly's minimum for its CPUs: 256
MB per shared CPU, 2,048 MB per performance CPU. The local fleet uses the CPUs for how many worker
processes each machine runs (the image's launcher runs one per CPU) and sets ``FLY_VM_MEMORY_MB``
in each machine, as Fly does (the layer sizes its session budget from it).

References: "fly.toml configuration", the ``[[vm]]`` section
(https://fly.io/docs/reference/configuration/#the-vm-section); "Machine sizing"
(https://fly.io/docs/machines/guides-examples/machine-sizing/); "Scale Machine CPU and RAM"
(https://fly.io/docs/apps/scale-machine/, the default size); "The Machine runtime environment"
(https://fly.io/docs/machines/runtime-environment/, ``FLY_VM_MEMORY_MB``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Fly's default when fly.toml has no [[vm]] and no machine to infer a size from.
DEFAULT_PRESET = "shared-cpu-1x"
# Fly's minimum memory per CPU of each kind, which is what a preset gives.
_MEMORY_PER_CPU_MB = {"shared-cpu": 256, "performance": 2048}
_PRESET = re.compile(r"(shared-cpu|performance)-(\d+)x")
_MEMORY = re.compile(r"(\d+)\s*(mb|gb|m|g)?", re.IGNORECASE)
# The launcher takes 1 to 256 workers.
MAX_CPUS = 256


@dataclass(frozen=True, slots=True)
class VmSize:
    """The CPUs and memory (MB) of each machine, and where they came from (for the banner)."""

    cpus: int = 1
    memory_mb: int = 256
    source: str = f"no [[vm]] in fly.toml: Fly's default {DEFAULT_PRESET}"

    def __post_init__(self) -> None:
        if not 1 <= self.cpus <= MAX_CPUS:
            raise ValueError(f"[[vm]] cpus must be from 1 to {MAX_CPUS}, not {self.cpus}")
        if self.memory_mb < 1:
            raise ValueError("[[vm]] memory must be at least 1 MB")

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> VmSize:
        """The size fly.toml's first ``[[vm]]`` entry gives (Fly's default without one).

        Raises ``ValueError`` naming the key when a value is not one Fly takes.
        """
        entries = document.get("vm")
        if entries is None:
            return cls()
        entries = [entries] if isinstance(entries, dict) else entries
        if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
            raise ValueError("[[vm]] must be an array of tables, each with cpus and memory")
        vm = entries[0]
        preset = vm.get("size", DEFAULT_PRESET)
        match = _PRESET.fullmatch(preset) if isinstance(preset, str) else None
        if match is None:
            raise ValueError(f"[[vm]] size {preset!r} is not a preset such as shared-cpu-2x or performance-1x")
        preset_cpus = int(match.group(2))
        cpus = vm.get("cpus", preset_cpus)
        if isinstance(cpus, bool) or not isinstance(cpus, int):
            raise ValueError("[[vm]] cpus must be a whole number, such as 2")
        memory = vm.get("memory", vm.get("memory_mb"))
        # Without a memory key, Fly's minimum for the CPUs (the preset's, scaled to explicit cpus).
        memory_mb = cpus * _MEMORY_PER_CPU_MB[match.group(1)] if memory is None else parse_memory(memory)
        described = [f"cpus = {cpus}" if "cpus" in vm else f"size {preset}"]
        described.append(f"memory {memory!r}" if memory is not None else f"{memory_mb} MB for {cpus} CPU")
        return cls(cpus=cpus, memory_mb=memory_mb, source=f"fly.toml [[vm]] {', '.join(described)}")


def parse_memory(value: object) -> int:
    """Megabytes from a ``[[vm]] memory`` value: a number of MB, or ``"512mb"``, ``"1gb"``, ``"2g"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _MEMORY.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f'[[vm]] memory {value!r} must be a size such as "512mb" or "1gb", or a number of MB')
    unit = (match.group(2) or "mb").lower()
    return int(match.group(1)) * (1024 if unit.startswith("g") else 1)
