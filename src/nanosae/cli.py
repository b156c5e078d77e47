"""The `nanosae` command: parses flags into configs and calls the library. No logic lives here."""

from __future__ import annotations

import math
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
    t = str(text).strip().lower().replace("_", "")
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except (ValueError, KeyError):
        value = math.nan
    if not (math.isfinite(value) and value == int(value)):
        raise ConfigError(f"cannot read {text!r} as a whole count (expected e.g. 4096, 200k, 2M)")
    return int(value)


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

    def update(self, done: int, rate: float, note: str = "", total: int | None = None) -> None:
        self.bar.update(self.task, completed=done, total=total, rate=f"{rate:,.0f} tok/s" if rate > 0 else "", note=note)


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


def parse_list(text: str, kind: type) -> list:
    """'2304,4608' -> [2304, 4608] (sweep values)."""
    try:
        return [kind(parse_count(v) if kind is int else v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"cannot read {text!r} as a comma-separated list of {kind.__name__}") from None


@app.command()
def train(
    out: Path = typer.Option(Path("runs/sae"), help="Run directory (several SAEs: one subdirectory each)."),
    acts: list[Path] = typer.Option(None, help="Activation store(s) from `nanosae collect` (default: stream from the model)."),
    model: str = typer.Option("smollm2-135m", help="Host model, when streaming."),
    hook: list[str] = typer.Option(["blocks.15.hook_resid_post"], help="Hook point(s), when streaming: all in one pass."),
    hook_out: str = typer.Option(None, help="Transcoder: the hook predicted from --hook (e.g. blocks.5.hook_mlp_out)."),
    acts_out: Path = typer.Option(None, help="Transcoder from stores: the target hook's store (same collection as --acts)."),
    skip_connection: bool = typer.Option(False, help="Transcoder: also learn a linear skip map W_skip."),
    crosscoder: bool = typer.Option(False, help="Train one crosscoder over all --hook (or --acts) values instead of one SAE each."),
    data: list[str] = typer.Option(["builtin:pydocs"], help=DATA_HELP),
    context_size: int = typer.Option(256, help="Tokens per window, when streaming."),
    tokens: str = typer.Option("2M", help="Training tokens, e.g. 200k, 2M."),
    arch: str = typer.Option("topk", help="relu, topk, batchtopk, jumprelu, gated, matryoshka; several train together."),
    d_sae: str = typer.Option("4608", help="Latents; several (2304,4608) train together."),
    k: str = typer.Option("32", help="Active latents per token (topk, batchtopk); several train together."),
    l1_coefficient: str = typer.Option(None, help="L1 (relu, gated) or L0 (jumprelu) weight; several train together."),
    groups: str = typer.Option(None, help="Matryoshka prefix sizes, e.g. 576,1152,2304,4608 (default d_sae/8,/4,/2,1)."),
    batch_size: int = typer.Option(None, help="Tokens per step (default: ~500 steps for short runs, at most 4096)."),
    lr: float = typer.Option(None, help="Adam learning rate (default 5.4e-4 / sqrt(d_sae / 16384))."),
    lr_schedule: str = typer.Option("linear", help="constant, cosine or linear decay at the end."),
    lr_warmup_steps: int = typer.Option(None),
    grad_clip: float = typer.Option(1.0),
    ema_decay: float = typer.Option(None, help="Save an EMA of the weights (e.g. 0.999)."),
    init_b_dec: str = typer.Option("geometric_median", help="geometric_median, mean, zeros."),
    init_encoder_scale: float = typer.Option(0.5, help="W_enc starts at this times W_dec.T."),
    input_norm: str = typer.Option("none", help="none, or layer_norm: centre and scale each token (OpenAI's TopK SAEs)."),
    dead_tokens: int = typer.Option(None, help="Tokens without firing after which a latent counts as dead."),
    k_aux: int = typer.Option(None, help="Dead latents in the AuxK loss (default d_in/2)."),
    seed: int = typer.Option(0),
    checkpoint_every: int = typer.Option(500, help="Checkpoint every N steps (0 = only at the end and on Ctrl-C)."),
    resume: bool = typer.Option(False, help="Continue from the newest checkpoints in --out."),
    log_every: int = typer.Option(10),
    tensorboard: bool = typer.Option(False, help="Also log to RUN/tensorboard (needs tensorboard)."),
    wandb: bool = typer.Option(False, help="Also log to Weights & Biases (needs wandb)."),
    device: str = typer.Option("cpu"),
) -> None:
    """Train SAEs from stores or straight from the model; several settings train together from one stream."""
    import itertools

    from nanosae.config import DataConfig, TrainConfig
    from nanosae.train import train as run_train

    sources = [("acts", str(a)) for a in acts] if acts else [("hook", h) for h in hook]
    if crosscoder:
        sources = [("crosscoder", ",".join(where for _, where in sources))]
    elif (hook_out or acts_out) and len(sources) > 1:
        raise ConfigError("a transcoder reads one hook (--hook or --acts) and predicts --hook-out / --acts-out")
    archs, sizes, ks = parse_list(arch, str), parse_list(d_sae, int), parse_list(k, int)
    coeffs = parse_list(l1_coefficient, float) if l1_coefficient else [None]
    cfgs = []
    for (kind, where), a, size, kk, coeff in itertools.product(sources, archs, sizes, ks, coeffs):
        parts = [Path(where).name if len(sources) > 1 else "", a if len(archs) > 1 else "",
                 f"d_sae={size}" if len(sizes) > 1 else "", f"k={kk}" if len(ks) > 1 else "",
                 f"l1={coeff}" if len(coeffs) > 1 else ""]
        name = "-".join(p for p in parts if p)
        cfgs.append(TrainConfig(
            out=str(out / name if name else out), acts=where if kind == "acts" else None, model=model,
            hook=where if kind == "hook" else hook[0], data=DataConfig(specs=list(data), context_size=context_size),
            hook_out=hook_out, acts_out=str(acts_out) if acts_out else None, skip_connection=skip_connection,
            crosscoder_hooks=list(hook) if crosscoder and not acts else None,
            crosscoder_acts=[str(a) for a in acts] if crosscoder and acts else None,
            tokens=parse_count(tokens), architecture=a, d_sae=size, k=kk, sparsity_coefficient=coeff,
            matryoshka_groups=parse_list(groups, int) if groups else None,
            batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, lr_warmup_steps=lr_warmup_steps, grad_clip=grad_clip,
            ema_decay=ema_decay, init_b_dec=init_b_dec, init_encoder_scale=init_encoder_scale, input_norm=input_norm, dead_tokens=dead_tokens, k_aux=k_aux, seed=seed,
            checkpoint_every=checkpoint_every, resume=resume, log_every=log_every, tensorboard=tensorboard,
            wandb=wandb, device=device))
    steps = cfgs[0].tokens // cfgs[0].batch_size
    label = f"train {len(cfgs)} SAEs" if len(cfgs) > 1 else f"train {arch}"
    with TokenProgress(label, steps) as bar:
        def show(p) -> None:
            m = p.metrics
            bar.update(p.step, m["tokens_per_s"], f"loss {m['loss']:.3g} fvu {m['fvu']:.3f} l0 {m['l0']:.1f} "
                                                  f"dead {m['dead_fraction']:.1%}")
        results = run_train(cfgs if len(cfgs) > 1 else cfgs[0], progress=show)
    for result in results if isinstance(results, list) else [results]:
        m = result.metrics
        console.print(f"saved {result.run_dir / 'sae'}  (fvu {m.get('fvu', float('nan')):.4f}, "
                      f"l0 {m.get('l0', float('nan')):.1f}, dead {m.get('dead_fraction', 0):.2%})")


def resolve_sae(path: Path) -> tuple[Path | None, Path]:
    """(run dir or None, SAE path): a run dir holds sae/; anything else is an SAE file or directory."""
    if (path / "sae" / "cfg.json").exists():
        return path, path / "sae"
    return None, path


@app.command("eval")
def eval_cmd(
    paths: list[Path] = typer.Argument(..., help="Run directories or SAE files/dirs (several: evaluated on the same tokens)."),
    model: str = typer.Option(None, help="Host model (default: the SAE's model_name)."),
    hook: str = typer.Option(None, help="Hook point (default: the SAE's hook_name)."),
    data: list[str] = typer.Option(["builtin:pydocs"], help=DATA_HELP),
    split: str = typer.Option("eval", help="Documents: eval (held out: every 20th), train, all."),
    tokens: str = typer.Option("20k", help="Evaluation tokens."),
    context_size: int = typer.Option(256),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    ablation: str = typer.Option("zero", help="Baseline for the CE score: zero or mean ablation."),
    out: Path = typer.Option(None, help="Where report.html goes (default: the run dir, or the sweep's parent)."),
    device: str = typer.Option("cpu"),
    tokenizer: Path = typer.Option(None, help=TOKENIZER_HELP),
) -> None:
    """Evaluate SAEs: FVU, L0, dead/dense latents, CE/KL with the SAE spliced in; writes eval.json and report.html."""
    from nanosae.config import DataConfig
    from nanosae.eval import evaluate
    from nanosae.eval.report import TABLE_KEYS, write_report
    from nanosae.io import write_json, write_lock
    from nanosae.models import load_model
    from nanosae.sae import SAE

    located = [resolve_sae(p) for p in paths]
    saes = [SAE.load(sae_path, device=device) for _, sae_path in located]
    spec = model or saes[0].cfg.model_name
    if not spec:
        raise ConfigError("the SAE does not name its model; pass --model")
    host = load_model(spec, device=device, tokenizer=tokenizer)
    n = parse_count(tokens)
    cfg = DataConfig(specs=list(data), split=split, context_size=context_size)
    with TokenProgress("eval", n) as bar:
        results = evaluate(saes, host, cfg, tokens=n, batch_size=batch_size, ablation=ablation,
                           hooks=[hook] * len(saes) if hook else None,
                           progress=lambda done, total, sec: bar.update(done, done / max(sec, 1e-9)))
    names = [(run or sae_path).name for run, sae_path in located]
    for (run, sae_path), result in zip(located, results):
        if run is not None:
            with write_lock(run):  # not while a training run writes this directory
                write_json(run / "eval.json", result)
        elif sae_path.is_file():  # e.g. an OpenAI .pt: eval.json beside it, named after it
            write_json(sae_path.with_suffix(".eval.json"), result)
        else:
            write_json(sae_path / "eval.json", result)
    target = out or (located[0][0] if len(located) == 1 and located[0][0] else Path(paths[0]).resolve().parent)
    report = write_report(results, names, Path(target) / "report.html")
    table = Table(title=f"{spec} · {results[0]['hook']} · {results[0]['tokens']:,} tokens")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    for key in TABLE_KEYS:
        table.add_row(key, *[f"{r[key]:.4g}" if isinstance(r[key], float) else str(r[key]) for r in results])
    console.print(table)
    console.print(f"report: {report}")


def _load_sae_and_model(path: Path, model: str | None, device: str, tokenizer: Path | None):
    from nanosae.models import load_model
    from nanosae.sae import SAE

    run, sae_path = resolve_sae(path)
    sae = SAE.load(sae_path, device=device)
    spec = model or sae.cfg.model_name
    if not spec:
        raise ConfigError(f"{path}: the SAE does not name its model; pass --model")
    return run, sae, load_model(spec, device=device, tokenizer=tokenizer)


def _labels(db_path: Path | None, name: str) -> dict:
    """Explanations from a features.db, keyed (sae name, latent)."""
    if db_path is None or not Path(db_path).exists():
        return {}
    from nanosae.interp.features import open_db

    con = open_db(db_path)
    return {(name, r["id"]): r["explanation"] for r in con.execute("SELECT id, explanation FROM latents WHERE explanation IS NOT NULL")}


@app.command()
def features(
    path: Path = typer.Argument(..., help="Run directory or SAE file/dir (ours, SAELens, OpenAI)."),
    model: str = typer.Option(None, help="Host model (default: the SAE's model_name)."),
    hook: str = typer.Option(None, help="Hook point (default: the SAE's hook_name)."),
    data: list[str] = typer.Option(["builtin:pydocs"], help=DATA_HELP),
    split: str = typer.Option("all", help="Documents: all, train, eval."),
    tokens: str = typer.Option("100k", help="Tokens to stream through the model."),
    context_size: int = typer.Option(256),
    top_n: int = typer.Option(20, help="Top-activating examples per latent."),
    batch_size: int = typer.Option(8),
    out: Path = typer.Option(None, help="Database file (default: RUN/features.db)."),
    acts: Path = typer.Option(None, help="Read the SAE's input from this store (from `nanosae collect`) instead "
                                         "of running the model; --data/--split/--context-size are then not used."),
    device: str = typer.Option("cpu"),
    tokenizer: Path = typer.Option(None, help=TOKENIZER_HELP),
) -> None:
    """Build features.db: densities, histograms, top and quantile examples, logit effects, co-firing (resumable)."""
    from nanosae.config import DataConfig
    from nanosae.interp.features import FeaturesConfig, build_features

    cfg = FeaturesConfig(data=DataConfig(specs=list(data), split=split, context_size=context_size),
                         tokens=parse_count(tokens), top_n=top_n, batch_size=batch_size)
    run, sae, host = _load_sae_and_model(path, model, device, tokenizer)
    target = out or ((run or (path if path.is_dir() else path.parent)) / "features.db")
    with TokenProgress("features", cfg.tokens) as bar:
        build_features(sae, host, cfg, target, hook=hook, acts=acts,
                       progress=lambda done, total, sec: bar.update(done, done / max(sec, 1e-9)))
    console.print(f"wrote {target}")


@app.command()
def track(
    prompt: str = typer.Argument(...),
    sae: list[Path] = typer.Option(..., help="SAE (run dir or file); repeatable to track several at once."),
    model: str = typer.Option(None, help="Host model (default: the first SAE's model_name)."),
    max_new_tokens: int = typer.Option(32),
    top_k: int = typer.Option(5, help="Features shown per token and SAE."),
    temperature: float = typer.Option(0.0),
    seed: int = typer.Option(0),
    chat: bool = typer.Option(False, help="Wrap the prompt in the model's chat format."),
    device: str = typer.Option("cpu"),
    tokenizer: Path = typer.Option(None, help=TOKENIZER_HELP),
) -> None:
    """Generate and show, live, the top features of every new token; a summary at the end."""
    from nanosae.interp.live import FeatureTracker
    from nanosae.sae import SAE

    run, first, host = _load_sae_and_model(sae[0], model, device, tokenizer)
    saes, labels = {}, {}
    for i, p in enumerate(sae):
        r, path = resolve_sae(p)
        name = (r or path).name if len(sae) > 1 else "sae"
        saes[name] = first if i == 0 else SAE.load(path, device=device)
        labels |= _labels((r or path) / "features.db" if (r or path).is_dir() else None, name)
    tracker = FeatureTracker(host, saes, top_k=top_k, labels=labels)

    def show(t) -> None:
        feats = "  ".join(f"{f.latent}:{f.activation:.2f}" + (f" ({f.label})" if f.label else "") for f in t.features)
        console.print(f"[bold]{t.text!r:>14}[/bold]  {feats}", highlight=False)

    gen = tracker.generate(prompt, callback=show, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, chat=chat)
    console.print(f"\n[bold]{prompt}[/bold]{gen.text}\n", highlight=False)
    table = Table(title="most active features")
    for col in ("sae", "latent", "tokens active", "max activation", "label"):
        table.add_column(col)
    for f, count in tracker.summary():
        table.add_row(f.sae, str(f.latent), str(count), f"{f.activation:.2f}", f.label or "")
    console.print(table)


@app.command()
def steer(
    prompt: str = typer.Argument(...),
    sae: Path = typer.Option(..., help="SAE (run dir or file)."),
    feature: list[str] = typer.Option(..., help="LATENT=+V adds V·W_dec, LATENT=-V subtracts, LATENT=V clamps, LATENT=0 ablates."),
    model: str = typer.Option(None, help="Host model (default: the SAE's model_name)."),
    max_new_tokens: int = typer.Option(32),
    temperature: float = typer.Option(0.0),
    seed: int = typer.Option(0),
    chat: bool = typer.Option(False, help="Wrap the prompt in the model's chat format."),
    device: str = typer.Option("cpu"),
    tokenizer: Path = typer.Option(None, help=TOKENIZER_HELP),
) -> None:
    """Generate with and without feature edits (same seed) and show both side by side."""
    from nanosae.interp.live import parse_edit, steer as run_steer

    _, s, host = _load_sae_and_model(sae, model, device, tokenizer)
    edits = [parse_edit(f) for f in feature]
    base, steered = run_steer(host, s, edits, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                              seed=seed, chat=chat)
    table = Table(title=prompt, show_lines=True)
    table.add_column("baseline")
    table.add_column("steered: " + ", ".join(feature))
    table.add_row(base.text, steered.text)
    console.print(table)


@app.command()
def view(
    run: Path = typer.Argument(..., help="Run directory with features.db (and eval.json)."),
    port: int = typer.Option(8000, help="Port to listen on (1..65535)."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (default: this machine only; requests must name "
                                               "localhost or this address, 0.0.0.0 accepts any name)."),
    model: str = typer.Option(None, help="Host model for 'run text' and steering (default: the SAE's model_name)."),
    export: Path = typer.Option(None, help="Write a self-contained static site to this new or empty directory (or "
                                           "an earlier export, which is replaced) instead of serving."),
) -> None:
    """Browse features: overview, feature pages, run text, steering playground (or --export a static site)."""
    from nanosae.viewer import create_app, export_static

    if export is not None:
        out = export_static(run, export)
        console.print(f"static site written to {out} (open {out / 'index.html'})")
        return
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be 1..65535, got {port}")
    import uvicorn

    app_ = create_app(run, model=model, host=host)
    console.print(f"nanosae viewer on http://{host}:{port}")
    uvicorn.run(app_, host=host, port=port, log_level="warning")


@app.command()
def explain(
    run: Path = typer.Argument(..., help="Run directory (or features.db) to explain."),
    method: str = typer.Option("n2g", help="n2g (token patterns) or llm (a language model writes, then simulates)."),
    explainer_url: str = typer.Option(None, envvar="NANOSAE_EXPLAINER_URL",
                                      help="OpenAI-compatible endpoint for --method llm (default: the local host model)."),
    explainer_model: str = typer.Option("gpt-4o-mini", help="Model name sent to the endpoint."),
    max_features: int = typer.Option(100, help="--method llm: explain this many of the most frequent features (0 = all)."),
    model: str = typer.Option(None, help="Local explainer model (default: the SAE's model_name)."),
) -> None:
    """Write an explanation and a held-out score for every feature into features.db."""
    from nanosae.interp.explain import explain_n2g
    from nanosae.interp.llm_explain import HTTPExplainer, LocalExplainer, explain_llm

    with TokenProgress("explain", 1) as bar:
        def show(done: int, total: int) -> None:
            bar.update(done, 0.0, total=total)

        if method == "n2g":
            n = explain_n2g(run, progress=show)
        elif method == "llm":
            if explainer_url:
                explainer = HTTPExplainer(explainer_url, model=explainer_model)
            else:
                _, _, host = _load_sae_and_model(run, model, "cpu", None)
                explainer = LocalExplainer(host)
            n = explain_llm(run, explainer, max_features=max_features or None, progress=show)
        else:
            raise ConfigError(f"unknown explanation method {method!r}; expected n2g or llm")
    console.print(f"explained {n} features in {run}")


export_app = typer.Typer(no_args_is_help=True, help="Export an SAE for other tools.")
app.add_typer(export_app, name="export")


@export_app.command("saelens")
def export_saelens_cmd(run: Path = typer.Argument(...), out: Path = typer.Option(..., help="Output directory.")) -> None:
    """A plain SAELens-loadable directory (BatchTopK becomes JumpReLU with its threshold, as SAELens runs it)."""
    from nanosae.export.neuronpedia import export_saelens

    console.print(f"wrote {export_saelens(run, out)}")


@export_app.command("neuronpedia")
def export_neuronpedia_cmd(
    run: Path = typer.Argument(..., help="Run directory with sae/ and features.db."),
    out: Path = typer.Option(..., help="Output directory."),
    model_id: str = typer.Option(None, help="Neuronpedia model id (default: the model name)."),
    sae_set: str = typer.Option(None, help="Neuronpedia SAE set name."),
) -> None:
    """Neuronpedia upload files: the SAE (SAELens format), dashboard batches, explanations, a README."""
    from nanosae.export.neuronpedia import export_neuronpedia

    console.print(f"wrote {export_neuronpedia(run, out, model_id=model_id, sae_set=sae_set)} (see its README.md)")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Where the demo writes (an interrupted demo continues)."),
    quick: bool = typer.Option(False, help="A first look in a few minutes (fewer tokens everywhere)."),
) -> None:
    """The whole path on SmolLM2 + Python's docs: collect, train, evaluate, features, explanations, steering."""
    from nanosae.demo import DemoConfig, run_demo
    from nanosae.eval.report import TABLE_KEYS

    bars: dict[str, TokenProgress] = {}

    def show(stage: str, done: int, total: int, seconds: float) -> None:
        if stage not in bars:
            for bar in bars.values():
                bar.__exit__()
            bars[stage] = TokenProgress(stage, total).__enter__()
        bars[stage].update(done, done / seconds if seconds > 0 else 0.0, total=total)

    try:
        result = run_demo(DemoConfig(out=str(out), quick=quick), progress=show)
    finally:
        for bar in bars.values():
            bar.__exit__()
    m = result["metrics"]
    table = Table(title=f"SmolLM2-135M · {m['hook']} · TopK d_sae {m['d_sae']}, k {m['k']} · {m['tokens']:,} held-out tokens")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in TABLE_KEYS:
        table.add_row(key, f"{m[key]:.4g}" if isinstance(m[key], float) else str(m[key]))
    console.print(table)
    feats = Table(title="five interesting features (N2G explanations, held-out F1)")
    for col in ("feature", "density", "explanation", "score", "top output tokens"):
        feats.add_column(col)
    for f in result["features"]:
        feats.add_row(str(f["id"]), f"{f['density']:.2%}", f["explanation"], f"{f['score']:.2f}", " ".join(map(repr, f["top_logits"])))
    console.print(feats)
    st = result["steering"]
    if st:
        steer_table = Table(title=f"steering: feature {st['feature']} added to {st['prompt']!r}", show_lines=True)
        steer_table.add_column("baseline")
        steer_table.add_column("steered")
        steer_table.add_row(st["baseline"], st["steered"])
        console.print(steer_table)
    console.print("time: " + " · ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items()))
    console.print(f"report: {out / 'report.html'}\nviewer: nanosae view {out}\nstatic site: nanosae view {out} --export {out / 'site'}")


def main() -> None:
    """Entry point: nanosae errors become one red line and exit code 1, not a traceback."""
    try:
        app()
    except NanosaeError as e:
        from rich.text import Text

        message = " ".join(str(e).split("\n")) or type(e).__name__  # one line, and no rich markup read from it
        Console(stderr=True).print(Text.assemble(("error: ", "red"), message), highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
