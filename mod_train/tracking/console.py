"""A quiet console for multi-process runs: only rank 0 speaks, and the known warnings of the
dependencies (Transformer Engine / Apex fallbacks, Megatron-FSDP notices, DeepSpeed's accelerator
guess and op builds, deprecations inside torch / megatron) are counted instead of printed, with one
summary line at exit:

    mod-train: suppressed 14 known dependency warnings (set MOD_TRAIN_LOGLEVEL=INFO to see them)

``MOD_TRAIN_LOGLEVEL`` brings everything back: set to any level it becomes the logging level and
nothing is suppressed; INFO or DEBUG also let every rank print. ``train.log_all_ranks=true`` lets
every rank print while keeping the known warnings summarised.

Why per process and not in the launcher: the noise is written by each rank's own imports, and
torchrun passes every rank's stdout/stderr through unchanged. Errors always show: other ranks keep
stderr for tracebacks and ERROR records; only their stdout, warnings and INFO/WARNING logs go.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Pattern, Sequence, TextIO

LOGLEVEL_ENV = "MOD_TRAIN_LOGLEVEL"
VERBOSE_LEVELS = ("DEBUG", "INFO")  # these levels also turn on the console of every rank
MLFLOW_LOGLEVEL_ENV = "MLFLOW_LOGGING_LEVEL"  # mlflow installs its own INFO handler otherwise

# Messages the dependencies print on every start of a CPU (or TE-less) run that need no action.
KNOWN_DEPENDENCY_WARNINGS: Sequence[Pattern[str]] = tuple(re.compile(p) for p in (
    r"Transformer Engine (and Apex )?(is|are) not installed",  # megatron: torch fallbacks
    r"Apex is not installed",
    r"Megatron-FSDP|Detected Megatron Core",  # megatron's FSDP module announcing itself
    r"Setting accelerator to CPU",  # DeepSpeed on a machine without GPUs
    r"\bdeprecated\b",  # deprecations inside torch / megatron / DeepSpeed, not in our calls
    r"Unknown MLP type",  # megatron on our MoE layer subclass (see model/moe.py)
))


# Lines the dependencies print() to stdout; only these are taken out of stdout, so that program
# output (a generated text that happens to say "deprecated") is never filtered.
KNOWN_DEPENDENCY_PRINTS: Sequence[Pattern[str]] = tuple(re.compile(p) for p in (
    r"^DeepSpeed \S+ built successfully",  # DeepSpeed's shm comm op, printed on first use
))


def is_known_dependency_warning(message: str) -> bool:
    return any(p.search(message) for p in KNOWN_DEPENDENCY_WARNINGS)


def is_known_dependency_print(line: str) -> bool:
    return any(p.search(line) for p in KNOWN_DEPENDENCY_PRINTS)


@dataclass(frozen=True)
class ConsolePolicy:
    """What one process prints, decided once from its rank, the config and the environment."""

    rank: int
    level: int  # logging level of the root logger
    show_this_rank: bool  # False: stdout, warnings and logs below ERROR are dropped
    suppress_known: bool  # count the known dependency warnings instead of printing them

    @classmethod
    def from_env(cls, rank: int, log_all_ranks: bool = False,
                 env_level: Optional[str] = None) -> "ConsolePolicy":
        """``env_level``: the value of MOD_TRAIN_LOGLEVEL (None or empty: unset).
        Raises ValueError naming the variable for a level logging does not know."""
        name = (env_level or "").strip().upper()
        if name and not isinstance(logging.getLevelName(name), int):
            raise ValueError(f"{LOGLEVEL_ENV}={env_level!r} is not a logging level; use DEBUG, INFO, "
                             "WARNING or ERROR")
        level = logging.getLevelName(name) if name else logging.WARNING
        show = rank == 0 or log_all_ranks or name in VERBOSE_LEVELS
        return cls(rank=rank, level=level, show_this_rank=show, suppress_known=not name)


class _CountingFilter(logging.Filter):
    """Drops (and counts) the records the console policy keeps off the screen."""

    def __init__(self, console: "QuietConsole") -> None:
        super().__init__()
        self.console = console

    def filter(self, record: logging.LogRecord) -> bool:
        # A library logger with its own level (megatron's are INFO) passes records below the
        # root's level on to the root's handlers: the policy's level applies here too.
        if record.levelno < self.console.policy.level:
            return False
        return self.console.allow(record.getMessage(), record.levelno)


class _LineFilter(io.TextIOBase):
    """A text stream that forwards whole lines for which ``keep(line)`` is true."""

    def __init__(self, target: TextIO, keep: Callable[[str], bool]) -> None:
        super().__init__()
        self.target = target
        self._keep = keep
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if self._keep(line):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        # A flushed partial line (a progress bar) goes out now rather than at the next newline.
        if self._partial:
            partial, self._partial = self._partial, ""
            if self._keep(partial):
                self.target.write(partial)
        self.target.flush()

    def __getattr__(self, name: str):  # buffer, errors, ...: those of the real stream
        return getattr(self.target, name)

    def fileno(self) -> int:  # subprocesses and faulthandler write to the real descriptor
        return self.target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.target, "encoding", "utf-8")

    def isatty(self) -> bool:
        return self.target.isatty()


class QuietConsole:
    """Applies a ``ConsolePolicy`` to this process (``install``) and counts what it suppressed."""

    def __init__(self, policy: ConsolePolicy, program: str = "mod-train") -> None:
        self.policy = policy
        self.program = program  # the summary line's prefix
        self.suppressed = 0  # known dependency warnings not printed on this rank
        self._stdout: Optional[TextIO] = None

    # -- decisions (also used by tests)
    def allow(self, message: str, levelno: int = logging.WARNING) -> bool:
        """Whether a warning or log message of this level may reach the console; counts the
        suppressed known ones."""
        return self._allow(message, levelno, is_known_dependency_warning)

    def allow_print(self, line: str) -> bool:
        """Whether a line written to stdout may reach the console."""
        return self._allow(line, logging.WARNING, is_known_dependency_print)

    def _allow(self, message: str, levelno: int, is_known: Callable[[str], bool]) -> bool:
        if levelno >= logging.ERROR:
            return True
        if not self.policy.show_this_rank:
            return False
        if self.policy.suppress_known and is_known(message):
            self.suppressed += 1
            return False
        return True

    def summary(self) -> Optional[str]:
        if not self.suppressed or not self.policy.show_this_rank:
            return None
        return (f"{self.program}: suppressed {self.suppressed} known dependency warnings "
                f"(set {LOGLEVEL_ENV}=INFO to see them)")

    # -- installation
    def install(self) -> "QuietConsole":
        """Once per process, after Hydra configured logging and before the heavy imports."""
        p = self.policy
        if p.suppress_known:
            os.environ.setdefault(MLFLOW_LOGLEVEL_ENV, "WARNING")
            for name in ("mlflow", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)
        root = logging.getLogger()
        root.setLevel(p.level if p.show_this_rank else max(p.level, logging.ERROR))
        counting = _CountingFilter(self)
        for handler in root.handlers:
            handler.addFilter(counting)
        # DeepSpeed's logger does not propagate to the root (its own stdout handler): filter at
        # the logger, which DeepSpeed keeps when it configures the logger at import.
        logging.getLogger("DeepSpeed").addFilter(counting)
        warnings.showwarning = self._show_warning
        self._stdout = sys.stdout
        sys.stdout = _LineFilter(sys.stdout, self.allow_print)
        atexit.register(self._print_summary)
        return self

    def _show_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if self.allow(text):
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    def _print_summary(self) -> None:
        # On stderr, with the warnings it sums up: stdout is a program's product (mod-generate's text).
        line = self.summary()
        if line:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()


def configure_console(log_all_ranks: bool = False, rank: Optional[int] = None,
                      program: str = "mod-train") -> QuietConsole:
    """Install the console policy of this process: ``rank`` defaults to torchrun's RANK;
    ``program`` prefixes the summary line."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    policy = ConsolePolicy.from_env(rank, log_all_ranks=log_all_ranks, env_level=os.environ.get(LOGLEVEL_ENV))
    return QuietConsole(policy, program).install()
