"""The `nanosae` command: parses flags into configs and calls the library. No logic lives here."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from nanosae.errors import NanosaeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Sparse autoencoders end to end: collect, train, evaluate, interpret, steer.")
console = Console()


@app.callback()
def _root() -> None:
    """Sparse autoencoders end to end: collect, train, evaluate, interpret, steer."""


@app.command()
def info(path: Path = typer.Argument(..., help="SAE directory (ours or SAELens) or OpenAI .pt file.")) -> None:
    """Print an SAE's config and parameter shapes."""
    from nanosae.sae import SAE

    sae = SAE.load(path)
    table = Table(title=str(path), show_header=True)
    table.add_column("field")
    table.add_column("value")
    for key, value in sae.cfg.to_dict().items():
        table.add_row(key, str(value))
    for name, tensor in sae.state_dict().items():
        table.add_row(name, f"{tuple(tensor.shape)} {str(tensor.dtype).replace('torch.', '')}")
    console.print(table)


def main() -> None:
    """Entry point: nanosae errors become one red line and exit code 1, not a traceback."""
    try:
        app()
    except NanosaeError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
