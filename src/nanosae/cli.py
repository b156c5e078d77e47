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


models_app = typer.Typer(no_args_is_help=True, help="Host models: list hook points, generate text.")
app.add_typer(models_app, name="models")
TOKENIZER_HELP = "nanochat tokenizer directory (default: tokenizer/ next to the checkpoints, $NANOCHAT_BASE_DIR)."


@models_app.command("hooks")
def models_hooks(
    spec: str = typer.Argument(..., help="smollm2-135m, a HF dir / hub name / .gguf, or nanochat:DIR[@STEP]."),
    tokenizer: Path = typer.Option(None, help=TOKENIZER_HELP),
) -> None:
    """List a model's hook points with their activation shapes."""
    from nanosae.models import load_model

    model = load_model(spec, tokenizer=tokenizer)
    table = Table(title=f"{model.name}: {model.n_layers} layers, d_model {model.d_model}, d_mlp {model.d_mlp}")
    table.add_column("hook")
    table.add_column("shape")
    for name in model.hook_names():
        table.add_row(name, f"(batch, seq, {model.hook_dim(name)})")
    console.print(table)


@models_app.command("generate")
def models_generate(
    spec: str = typer.Argument(..., help="smollm2-135m, a HF dir / hub name / .gguf, or nanochat:DIR[@STEP]."),
    prompt: str = typer.Argument(...),
    max_new_tokens: int = typer.Option(32, help="Tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_k: int = typer.Option(None, help="Sample from the k most likely tokens."),
    seed: int = typer.Option(0),
    chat: bool = typer.Option(False, help="Wrap the prompt in the model's chat format."),
    tokenizer: Path = typer.Option(None, help=TOKENIZER_HELP),
) -> None:
    """Print a continuation of PROMPT (greedy by default), streaming tokens as they come."""
    from nanosae.models import load_model

    model = load_model(spec, tokenizer=tokenizer)
    console.print(prompt, end="", style="bold", highlight=False)
    shown: list[int] = []

    def stream(step: int, token: int) -> None:
        before = model.tokenizer.decode(shown)
        shown.append(token)
        console.print(model.tokenizer.decode(shown)[len(before):], end="", highlight=False)

    model.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                   chat=chat, callback=stream)
    console.print()


def main() -> None:
    """Entry point: nanosae errors become one red line and exit code 1, not a traceback."""
    try:
        app()
    except NanosaeError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
