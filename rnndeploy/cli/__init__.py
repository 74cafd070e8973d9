"""The ``rnndeploy`` command line: one module per command group (train, export, run, serve, bench), each
parsing options, calling the library and printing. Heavy modules (torch, onnxruntime) are imported inside commands."""

from __future__ import annotations

import click

from rnndeploy import __version__

from . import bench as _bench
from . import export as _export
from . import run as _run
from . import serve as _serve
from . import train as _train
from .options import CONTEXT_SETTINGS


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="rnndeploy")
def main() -> None:
    """Train recurrent networks (RNN, LSTM, GRU), export them to ONNX and serve them step by step.

    Start with `rnndeploy demo`; every command explains itself with --help.

    \b
    Exit codes:
      0    done (for `serve`: stopped by Ctrl-C or SIGTERM after a graceful shutdown)
      1    a user error: the message names the input, what was expected and what to do
      2    a usage error: an unknown option or a value of the wrong kind
      130  stopped by Ctrl-C (`train` says which step its checkpoint holds and how to resume)
      143  stopped by SIGTERM (the same)
    """


for command in (
    _train.train,
    _train.demo,
    _export.export_cmd,
    _run.run_command,
    _run.generate_command,
    _run.info_command,
    _serve.serve_command,
    _bench.bench,
):
    main.add_command(command)
