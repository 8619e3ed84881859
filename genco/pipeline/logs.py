"""What a pipeline run says, in a step's log and on the local runner's console.

Inside a step: ``say`` prints one ``[genco]`` progress line (rows ingested, epochs with their
losses, RL steps), and ``progress_lines`` turns tqdm's bars, which redraw one line with
``\\r``, into whole lines a pod log keeps, at most one every few seconds per bar.

Around a local run: ``RunLog`` receives everything the local runner prints (its executor
JSON, every step's output), keeps all of it in a log file, and shows the console only the
task and ``[genco]`` lines unless verbose. ``root_cause`` reads a failed step's traceback
from that log: the exception that ended the step, its type resolved when it can be.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

PREFIX = "[genco] "
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# kfp.local's own lines, after the colour codes are stripped.
_TASK_LINE = re.compile(r"Task '([^']+)' finished with status (\w+)|Executing task '([^']+)'")
# The last line of a Python traceback: "pkg.mod.ErrorType: message" (or a bare type).
_EXC_LINE = re.compile(
    r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning))(?::\s?(.*))?$"
)


def say(message: str) -> None:
    """One progress line in the step's log (and on the local runner's console)."""
    print(PREFIX + message, flush=True)


class _Lines(io.TextIOBase):
    """A text stream for tqdm: each ``\\r`` redraw becomes a line, throttled to one per
    ``every_s`` seconds; a bar's final state (written before its newline) always shows."""

    def __init__(self, out: TextIO, every_s: float) -> None:
        self.out, self.every_s = out, every_s
        self.pending, self.last = "", 0.0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        for piece in re.split(r"(\r|\n)", text):
            if piece == "\n":
                self._emit(force=True)
            elif piece and piece != "\r":
                self.pending = piece.strip() or self.pending
                self._emit(force=False)
        return len(text)

    def _emit(self, force: bool) -> None:
        now = time.monotonic()
        if self.pending and (force or now - self.last >= self.every_s):
            self.out.write(self.pending + "\n")
            self.out.flush()
            self.pending, self.last = "", now

    def flush(self) -> None:
        self.out.flush()


@contextlib.contextmanager
def progress_lines(every_s: float = 5.0) -> Iterator[None]:
    """Within the block, tqdm bars (written to stderr) come out as whole lines."""
    original = sys.stderr
    sys.stderr = _Lines(original, every_s)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = original


class RunLog(io.TextIOBase):
    """Everything the local runner prints goes to ``path``; the console (``echo``) gets
    the task lines and ``[genco]`` progress lines, or everything when ``verbose``."""

    def __init__(self, path: str, echo: TextIO, verbose: bool = False) -> None:
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self.echo, self.verbose, self.buffer = echo, verbose, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.file.write(text)
        if self.verbose:
            self.echo.write(text)
            return len(text)
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            shown = _console_line(line)
            if shown:
                self.echo.write(shown + "\n")
        return len(text)

    def flush(self) -> None:
        self.file.flush()
        self.echo.flush()

    def close(self) -> None:
        if self.closed:
            return
        if self.buffer and not self.verbose:  # a last line without its newline
            shown = _console_line(self.buffer)
            if shown:
                self.echo.write(shown + "\n")
        super().close()  # flushes
        self.file.close()


def _console_line(line: str) -> str | None:
    plain = _ANSI.sub("", line).strip()
    if plain.startswith(PREFIX):
        return plain
    match = _TASK_LINE.search(plain)
    if match is None:
        return None
    if match.group(3):
        return f"{match.group(3)}: running"
    status = match.group(2).lower()
    return f"{match.group(1)}: {'failed' if status == 'failure' else status}"


@dataclass
class RootCause:
    """The exception that ended a failed step, as its log shows it."""

    type_name: str  # as printed: "genco.errors.ContractError", "FileNotFoundError"
    message: str
    traceback: str  # the step's last traceback, for bugs

    def exception_type(self) -> type[BaseException] | None:
        """The class, when its module imports (importing it is what makes the CLI's
        expected-error table able to recognise it)."""
        module_name, _, class_name = self.type_name.rpartition(".")
        try:
            module = importlib.import_module(module_name or "builtins")
        except ImportError:
            return None
        cls = getattr(module, class_name, None)
        return cls if isinstance(cls, type) and issubclass(cls, BaseException) else None


def failed_step(log_text: str) -> str | None:
    """The task the local runner last reported as failed in ``log_text``."""
    failed = re.findall(r"Task '([^']+)' finished with status FAILURE", _ANSI.sub("", log_text))
    return failed[-1] if failed else None


def root_cause(log_text: str, step: str) -> RootCause | None:
    """The last traceback in the section of ``log_text`` that ran ``step`` (its last
    attempt), or None when the step printed none (killed, out of memory)."""
    text = _ANSI.sub("", log_text)
    start = text.rfind(f"Executing task '{step}'")
    section = text[start:] if start >= 0 else text
    end = section.find(f"Task '{step}' finished")
    section = section if end < 0 else section[: section.rfind("\n", 0, end) + 1]
    lines = [line[4:] if line.startswith("    ") else line for line in section.splitlines()]
    first = max((i for i, line in enumerate(lines) if line.startswith("Traceback")), default=-1)
    if first < 0:
        return None
    chain_start = min(i for i, line in enumerate(lines) if line.startswith("Traceback"))
    tail = lines[first:]
    for i, line in enumerate(tail[1:], 1):
        match = _EXC_LINE.match(line.strip()) if not line.startswith(" ") else None
        if match:
            body = [match.group(2) or ""]
            for more in tail[i + 1 :]:  # a message of several lines, up to a blank line
                if not more.strip() or more.startswith("[KFP"):
                    break
                body.append(more.strip())
            chain = "\n".join(lines[chain_start : first + i + 1])
            return RootCause(match.group(1), " ".join(body).strip(), chain)
    return None
