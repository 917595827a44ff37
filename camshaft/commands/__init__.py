"""The CLI's commands, one module each, found automatically.

A command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``;
``common`` holds the shared argument types. ``ORDER`` lists the commands shown first in ``--help``.
"""

import pkgutil

ORDER = ("demo", "explain", "export", "inspect")


def command_names() -> list[str]:
    found = [m.name for m in pkgutil.iter_modules(__path__) if m.name != "common" and not m.name.startswith("_")]
    return [n for n in ORDER if n in found] + sorted(n for n in found if n not in ORDER)
