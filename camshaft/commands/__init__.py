"""The CLI's commands, one module each: ``HELP``, ``add_arguments(parser)``, ``run(args) -> int``.

A new command is a new module here plus its name in ``COMMANDS``.
"""

COMMANDS = ("demo", "explain", "export", "inspect")
