"""Docker's ``.dockerignore`` rules, to see what a build context holds without a Docker engine.

The rules, from Docker's documentation (https://docs.docker.com/build/concepts/context/#dockerignore-files)
and its matcher (github.com/moby/patternmatcher): lines starting with ``#`` are comments; each
other line is trimmed and cleaned like Go's ``filepath.Clean`` (a leading ``/`` is dropped); ``!``
makes an exception. A pattern is Go's ``filepath.Match`` (``*`` and ``?`` never match ``/``, ``[...]``
classes, ``\\`` escapes) plus ``**``, any number of directories, none included. A pattern matches a
path when it matches the path itself or one of its parent directories; the last matching line
wins. The context is every file that is not excluded.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Rule:
    """One line of a ``.dockerignore``: a cleaned pattern, and whether it is an exception (``!``)."""

    pattern: str
    exception: bool

    def matches(self, path: str) -> bool:
        """The pattern matches ``path`` (slash-separated, relative to the context) or one of its parents."""
        parts = path.split("/")
        candidates = ["/".join(parts[: count + 1]) for count in range(len(parts))]
        return any(_matches(self.pattern, candidate) for candidate in candidates)


def read_rules(text: str) -> list[Rule]:
    """The rules of a ``.dockerignore`` file's text, in order."""
    rules = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        pattern = line.strip()
        if not pattern:
            continue
        exception = pattern.startswith("!")
        if exception:
            pattern = pattern[1:].strip()
        pattern = posixpath.normpath(pattern)
        if len(pattern) > 1 and pattern.startswith("/"):
            pattern = pattern.lstrip("/")
        rules.append(Rule(pattern, exception))
    return rules


def excluded(rules: list[Rule], path: str) -> bool:
    """``path`` is left out of the build context."""
    left_out = False
    for rule in rules:
        # Only an exception can bring back a path already left out, and only a plain rule leave one out.
        if rule.exception != left_out:
            continue
        if rule.matches(path):
            left_out = not rule.exception
    return left_out


def build_context(root: Path, rules: list[Rule]) -> set[str]:
    """Every file under ``root`` that a build with these rules would send, as slash-separated paths."""
    sent = set()
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder, name).relative_to(root).as_posix()
            if not excluded(rules, path):
                sent.add(path)
    return sent


def _matches(pattern: str, path: str) -> bool:
    if pattern.startswith("**") and not any(char in pattern[2:] for char in "*?[\\"):
        # "**/name" (or "**name") is a suffix match; "**/name" also matches "name" at the root.
        suffix = pattern[2:]
        return path.endswith(suffix) or (suffix.startswith("/") and path == suffix[1:])
    return _regex(pattern).fullmatch(path) is not None


def _regex(pattern: str) -> re.Pattern[str]:
    out = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        index += 1
        if char == "*" and pattern[index : index + 1] == "*":
            index += 1
            if pattern[index : index + 1] == "/":
                index += 1
            out.append(".*" if index == len(pattern) else "(.*/)?")
        elif char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "\\" and index < len(pattern):
            out.append(re.escape(pattern[index]))
            index += 1
        elif char in "[]":
            out.append(char)
        else:
            out.append(re.escape(char))
    return re.compile("".join(out))
