"""The ``camshaft`` command: builds the parser from ``camshaft.commands`` and runs one."""

from __future__ import annotations

import argparse
import errno
import os
import warnings
import sys
import importlib

# glibc returns large freed blocks to the kernel and faults them back on every forward; raising
# its thresholds made CPU forwards ~30% faster here (shared/DESIGN.md). Only the main arena keeps
# to them: a thread's arena serves large blocks with mmap whatever the threshold, so the pipeline's
# worker threads ran resnet50 30% slower than the main thread until every thread shared the main
# arena (arena_max=1; convnext_tiny's pipeline 22 -> 31 images/s). It must be set before the
# process starts, so the CLI re-executes itself once with it.
GLIBC_TUNING = ("glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"
                ":glibc.malloc.arena_max=1")


def _tune_allocator(argv: list[str]) -> None:
    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ or os.environ.get("CAMSHAFT_NO_REEXEC"):
        return
    env = {**os.environ, "GLIBC_TUNABLES": GLIBC_TUNING}
    try:
        os.execve(sys.executable, [sys.executable, "-m", "camshaft", *argv], env)
    except OSError:
        return  # keep going untuned rather than fail


class _Parser(argparse.ArgumentParser):
    """Errors as one line with a pointer to ``--help``, not the whole usage above them."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an unknown flag after a command is that command's error (and its help)."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            owner = getattr(self, "commands", {}).get(getattr(parsed, "command", None), self)
            owner.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given ``argv``, only the command it names gets its arguments.

    Building a command's arguments may import torch (method options become flags), which takes
    seconds: ``camshaft --help`` and a mistyped command should not wait for that.
    """
    from camshaft import __version__
    from camshaft.commands import command_names

    names = command_names()
    chosen = None if argv is None else next((a for a in argv if not a.startswith("-")), None)
    parser = _Parser(prog="camshaft", description="Batch explanations (CAM, Grad-CAM) for image classifiers.")
    parser.add_argument("--version", action="version", version=f"camshaft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = {}  # name -> its parser: an unknown flag after a command is reported there
    for name in names:
        module = importlib.import_module(f"camshaft.commands.{name}")
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        parser.commands[name] = command
        if argv is None or name == chosen:
            module.add_arguments(command)
        command.set_defaults(run=module.run, resumable=getattr(module, "RESUMABLE", False))
    return parser


def _import_from_cwd() -> None:
    """``--model mymodels:build`` imports from the current folder, as under ``python -m camshaft`` (the
    re-executed CLI), also where the allocator is not tuned (the console script alone does not)."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def main(argv: list[str] | None = None) -> int:
    """The console entry point; re-executes with a tuned allocator only when run as a program."""
    if argv is None:
        argv = sys.argv[1:]
        _tune_allocator(argv)
        _import_from_cwd()
    try:
        args = build_parser(argv).parse_args(argv)  # imports torch: Ctrl-C often lands here
    except KeyboardInterrupt:
        print("camshaft: interrupted", file=sys.stderr)
        return 130
    from camshaft.errors import CamshaftError

    original = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *_: f"camshaft: warning: {message}\n"
    try:
        return args.run(args)
    except CamshaftError as e:
        print(f"camshaft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was finished is kept, and no traceback
        print(f"camshaft {args.command}: interrupted{_again(args, 'resume')}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (camshaft inspect ... | head): as other tools, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor at the interpreter's exit flush
        return 141  # 128 + SIGPIPE
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise  # anything else is unexpected: its traceback helps
        where = f" ({e.filename})" if e.filename else ""
        message = f"{os.strerror(e.errno)}{where}: free some space{_again(args, 'go on')}"
        print(f"camshaft {args.command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = original


def _again(args, verb: str) -> str:
    """How to carry on after a stop: a run keeps its finished partitions."""
    return f"; run the same command again to {verb} (finished partitions are kept)" if args.resumable else ""


if __name__ == "__main__":
    sys.exit(main())
