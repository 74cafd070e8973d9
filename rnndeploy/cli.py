"""The ``rnndeploy`` command line. Heavy modules (torch, onnxruntime) are imported inside commands."""

from __future__ import annotations

import click

from rnndeploy import __version__

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="rnndeploy")
def main() -> None:
    """Train recurrent networks (RNN, LSTM, GRU), export them to ONNX and serve them step by step.

    Start with `rnndeploy demo`; every command explains itself with --help.
    """
