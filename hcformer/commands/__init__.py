"""The ``hcformer`` sub-commands: one thin module per command over library calls.

A command ``hcformer some-name`` is the module ``hcformer.commands.some_name``, registered by
name (with its one-line help) in ``hcformer/cli.py:COMMANDS``. Each module holds:

- a docstring whose first paragraph is the command's ``--help`` description;
- ``main(argv: list[str]) -> int``: it builds its parser with :func:`._args.command_parser`,
  adds its arguments (the ones several commands share, such as ``--scale``, ``--device``,
  ``--set`` or the JSON ``--out``, come from :mod:`._args`, spelt once), calls library
  functions and prints their results; output files go through :func:`._args.write_output`.

Everything a command does beyond reading its arguments and printing lives in the library (so
Python callers and tests use the same functions the command does). A user error is raised as
:class:`hcformer.errors.HCFormerError`; ``hcformer.cli`` prints it as one line and exits 2.

``hcformer.cli`` imports only the chosen command's module. A command module imports its
library modules at the top, so what a command costs at start-up is what its library costs:
torch, mlflow and matplotlib stay out of the commands that do not need them because the
library modules those commands use are free of them at import. This package's ``__init__``
imports nothing.

To add a command: one module here (docstring, ``main``) and one line in ``cli.COMMANDS``.
"""
