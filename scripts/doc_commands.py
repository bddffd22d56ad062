"""List every shell command in README.md and docs/*.md, with its file and line.

    .venv/bin/python scripts/doc_commands.py            # file:line: command, one a line
    .venv/bin/python scripts/doc_commands.py --json     # [{"file", "line", "kind", "command"}]

A command is either a line of a fenced ``bash``/``sh``/``shell``/``console`` block (comment lines
skipped, ``\\`` continuations and ``for``/``while``/``if`` bodies joined, a ``$ `` prompt
stripped), a line of an untagged block that starts with a known program (or ``$ ``), or an
inline code span that starts with one (``.venv/bin/python -m ...``, ``edgeloop ...``,
``curl ...``), program and at least one argument. The section of docs/development.md that
records the run quotes commands and is skipped. It is the list that issue 13's "every command
in the README and docs/ was run as written" is checked against (docs/development.md).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Programs whose invocation makes a line or an inline span a command.
PROGRAMS = (
    ".venv/bin/python",
    ".venv/bin/pip",
    ".venv/bin/pytest",
    ".",
    "python",
    "python3",
    "pip",
    "edgeloop",
    "edgeloop-server",
    "edgeloop-agent",
    "edgeloop-sim",
    "bash",
    "sh",
    "docker-compose",
    "docker",
    "curl",
    "mosquitto",
    "mosquitto_passwd",
    "mosquitto_pub",
    "mosquitto_sub",
    "openssl",
    "st",
    "pytest",
    "ruff",
    "mypy",
    "systemctl",
    "sudo",
    "git",
    "export",
    "mkdir",
    "cp",
    "kill",
    "sqlite3",
    "pg_dump",
    "py-spy",
)
# Sections that quote commands to report on them (development.md's record of this check).
SKIPPED_SECTIONS = {"Commands in the docs, run as written"}
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
# Inline spans that quote a program's output rather than invoke it.
OUTPUT_SPANS = re.compile(r"^edgeloop-agent listening on ")
SHELL_LANGS = {"bash", "sh", "shell", "console", "shell-session"}
_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w-]*)")
_ENV_PREFIX = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+")
_INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
_OPENERS = re.compile(r"^(for|while|until|if|case)\b")
_CLOSERS = re.compile(r"^(done|fi|esac)\b")


@dataclass(frozen=True)
class Command:
    file: str
    line: int
    kind: str  # "block" or "inline"
    command: str


def starts_with_program(text: str, *, need_argument: bool) -> bool:
    """Whether ``text`` (env assignments allowed in front) invokes one of ``PROGRAMS``."""
    rest = _ENV_PREFIX.sub("", text.strip())
    if rest != text.strip() and rest:
        return True  # VAR=value program ...: a command whatever the program
    words = rest.split()
    if not words or words[0] not in PROGRAMS:
        return False
    return len(words) > 1 or not need_argument


def _block_commands(lines: list[tuple[int, str]], lang: str) -> list[tuple[int, str]]:
    """The commands of one fenced block: ``(first line number, joined command)``."""
    out: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    depth = 0
    for number, raw in lines:
        text = raw.strip()
        if not pending:
            if not text or text.startswith("#"):
                continue
            if text.startswith("$ "):
                text = text[2:].strip()
            elif lang == "console":
                continue  # output of the command above
            elif lang == "" and not starts_with_program(text, need_argument=False):
                continue  # an untagged block: only lines that invoke a program
            start = number
        pending.append(text.removesuffix("\\").rstrip())
        if _OPENERS.match(text) and not re.search(r"\b(done|fi|esac)\s*$", text):
            depth += 1
        elif _CLOSERS.match(text):
            depth -= 1
        if text.endswith("\\") or depth > 0:
            continue
        out.append((start, _join(pending, compound=_OPENERS.match(pending[0]) is not None)))
        pending = []
    if pending:
        out.append((start, " ".join(pending)))
    return out


def _join(parts: list[str], *, compound: bool) -> str:
    """Continuation lines join with a space; the lines of a ``for ... done`` with ``; `` where
    the shell needs a separator."""
    if not compound:
        return " ".join(parts)
    joined = parts[0]
    for part in parts[1:]:
        bare = re.search(r"(\bdo|\bthen|\belse|[{|;&])$", joined) is not None
        joined += (" " if bare else "; ") + part
    return joined


def commands_in(path: Path, root: Path = ROOT) -> list[Command]:
    """Every command in one Markdown file, in page order."""
    name = str(path.relative_to(root))
    found: list[Command] = []
    fence: str | None = None
    lang = ""
    block: list[tuple[int, str]] = []
    prose: list[tuple[int, str]] = []  # the paragraph being read: a span may cross its lines
    skipping = 0  # the level of the skipped section's heading, 0: none
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        heading = _HEADING.match(line) if fence is None else None
        if heading:
            level = len(heading.group(1))
            if skipping and level <= skipping:
                skipping = 0
            if heading.group(2) in SKIPPED_SECTIONS:
                skipping = level
        if skipping:
            continue
        match = _FENCE.match(line)
        if fence is None and match:
            found += _inline_commands(name, prose)
            fence, lang, block, prose = match.group(2), match.group(3).lower(), [], []
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                if lang in SHELL_LANGS or lang == "":
                    found += [Command(name, n, "block", c) for n, c in _block_commands(block, lang)]
                fence = None
            else:
                block.append((number, line))
            continue
        if line.strip():
            prose.append((number, line))
        else:
            found += _inline_commands(name, prose)
            prose = []
    return found + _inline_commands(name, prose)


def _inline_commands(name: str, paragraph: list[tuple[int, str]]) -> list[Command]:
    if not paragraph:
        return []
    text = "\n".join(line for _, line in paragraph)
    found = []
    for match in _INLINE.finditer(text):
        span = " ".join(match.group(1).split())
        if starts_with_program(span, need_argument=True) and not OUTPUT_SPANS.match(span):
            number = paragraph[0][0] + text.count("\n", 0, match.start())
            found.append(Command(name, number, "inline", span))
    return found


def all_commands(root: Path = ROOT) -> list[Command]:
    """README.md, then docs/*.md in name order."""
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    return [command for page in pages for command in commands_in(page, root)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON list instead of lines")
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="checkout to read (default: this one)"
    )
    args = parser.parse_args(argv)
    commands = all_commands(args.root.resolve())
    if args.json:
        json.dump([asdict(c) for c in commands], sys.stdout, indent=1)
        print()
    else:
        for c in commands:
            print(f"{c.file}:{c.line}: {c.command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
