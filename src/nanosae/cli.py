"""The `nanosae` command: parses flags into configs and calls the library. No logic lives here."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from nanosae.errors import ConfigError, NanosaeError

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


def parse_count(text: str) -> int:
    """'200k' -> 200000, '2M' -> 2000000, '4096' -> 4096."""
    units = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}
    t = text.strip().lower().replace("_", "")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, KeyError):
        raise ConfigError(f"cannot read {text!r} as a count (expected e.g. 4096, 200k, 2M)") from None


class TokenProgress:
    """A rich progress bar for long jobs: tokens done / total, tokens/s, ETA and a free-form note."""

    def __init__(self, description: str, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"),
                            console=console, transient=False)
        self.task = self.bar.add_task(description, total=total, rate="", note="")

    def __enter__(self) -> "TokenProgress":
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def update(self, done: int, rate: float, note: str = "") -> None:
        self.bar.update(self.task, completed=done, rate=f"{rate:,.0f} tok/s", note=note)


# Options shared by every command that reads text.
DATA_HELP = "Corpus: builtin:pydocs, builtin:stdlib, .txt/.jsonl/.parquet file, dir, glob, hf:NAME (repeatable)."


def data_config(data: list[str], context_size: int, pack: bool, exclude_first: int, split: str, shuffle_buffer: int,
                seed: int, text_field: str, txt_paragraphs: bool, encoding_errors: str):
    from nanosae.config import DataConfig

    return DataConfig(specs=list(data), context_size=context_size, pack=pack, exclude_first=exclude_first, split=split,
                      shuffle_buffer=shuffle_buffer, seed=seed, text_field=text_field, txt_paragraphs=txt_paragraphs,
                      encoding_errors=encoding_errors)


@app.command()
def collect(
    model: str = typer.Option("smollm2-135m", help="Host model: smollm2-135m, HF dir / hub name / .gguf, nanochat:DIR[@STEP]."),
    hook: list[str] = typer.Option(["blocks.15.hook_resid_post"], help="Hook point (repeatable: all in one pass)."),
    data: list[str] = typer.Option(["builtin:pydocs"], help=DATA_HELP),
    tokens: str = typer.Option("100k", help="Activations per hook, e.g. 250k, 2M (BOS positions excluded)."),
    out: Path = typer.Option(Path("runs/acts"), help="Output directory (one subdirectory per hook)."),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    dtype: str = typer.Option("float16", help="Storage dtype: float16, bfloat16, float32."),
    tokens_per_shard: int = typer.Option(32768, help="Tokens per shard file."),
    context_size: int = typer.Option(256, help="Tokens per window."),
    pack: bool = typer.Option(True, help="Pack documents into full windows (--no-pack: one truncated window per doc)."),
    exclude_first: int = typer.Option(0, help="Also drop the first N positions of each window."),
    split: str = typer.Option("train", help="Documents: train (all but every 20th), eval (every 20th), all."),
    shuffle_buffer: int = typer.Option(0, help="Shuffle documents through a buffer of this many (0 = in order)."),
    seed: int = typer.Option(0),
    text_field: str = typer.Option("text", help="Text field of .jsonl/.parquet/HF datasets."),
    txt_paragraphs: bool = typer.Option(False, help="One document per blank-line block of a .txt file."),
    encoding_errors: str = typer.Option("strict", help="Non-UTF-8 text: strict (error) or replace."),
    device: str = typer.Option("cpu"),
    tokenizer: Path = typer.Option(None, help=TOKENIZER_HELP),
) -> None:
    """Collect activations into a sharded on-disk store. Re-run the same command to resume."""
    from nanosae.config import CollectConfig
    from nanosae.data import collect as run_collect

    cfg = CollectConfig(model=model, hooks=list(hook), tokens=parse_count(tokens), out=str(out), batch_size=batch_size,
                        dtype=dtype, tokens_per_shard=tokens_per_shard, device=device,
                        tokenizer=str(tokenizer) if tokenizer else None,
                        data=data_config(data, context_size, pack, exclude_first, split, shuffle_buffer, seed,
                                         text_field, txt_paragraphs, encoding_errors))
    with TokenProgress("collect", cfg.tokens) as bar:
        def show(p) -> None:
            bar.update(p.tokens, p.tokens / max(p.seconds, 1e-9), f"{p.bytes_written / 1e6:,.0f} MB written")
        stores = run_collect(cfg, progress=show)
    for name, store in stores.items():
        console.print(f"{name}: {len(store):,} tokens × {store.d_in} ({store.dtype}) in {store.path}")


def main() -> None:
    """Entry point: nanosae errors become one red line and exit code 1, not a traceback."""
    try:
        app()
    except NanosaeError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
