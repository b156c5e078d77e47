"""The `nanosae` command: parses flags into configs and calls the library. No logic lives here."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from nanosae.config import (
    CollectConfig,
    EvalConfig,
    ExplainConfig,
    ExportConfig,
    GenerationConfig,
    InterveneConfig,
    PruneConfig,
    SourceConfig,
    TraceConfig,
    TrainConfig,
    ViewConfig,
)
from nanosae.demo import DemoConfig
from nanosae.errors import ConfigError, NanosaeError
from nanosae.interp.features import FeaturesConfig
from nanosae.options import command, gather_data, options_for, parse, parse_count
from nanosae.train.sweep import SWEEPABLE

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Sparse autoencoders end to end: collect, train, evaluate, interpret, steer.",
)
console = Console()


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        console.print(f"nanosae {version('nanosae')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print nanosae's version and exit."
    ),
) -> None:
    """Sparse autoencoders end to end: collect, train, evaluate, interpret, steer."""
    from nanosae.models import keep_freed_memory

    keep_freed_memory()  # the command owns its process: reuse freed activation memory (NANOSAE_MALLOC_TUNING=0: off)


@app.command()
def info(
    path: Path = typer.Argument(..., help="Run directory, SAE directory (ours or SAELens) or OpenAI .pt file."),
) -> None:
    """Print an SAE's config and parameter shapes."""
    from nanosae.rundir import locate
    from nanosae.sae import SAE

    sae = SAE.load(locate(path)[1])
    table = Table(title=str(path), show_header=True)
    table.add_column("field")
    table.add_column("value")
    for key, value in sae.cfg.to_dict().items():
        table.add_row(key, str(value))
    for name, tensor in sae.state_dict().items():
        table.add_row(name, f"{tuple(tensor.shape)} {str(tensor.dtype).replace('torch.', '')}")
    console.print(table)


TOKENIZER_HELP = "nanochat tokenizer directory (default: tokenizer/ next to the checkpoints, $NANOCHAT_BASE_DIR)."
MODEL_SPEC_HELP = "smollm2-135m, a HF dir / hub name / .gguf, or nanochat:DIR[@STEP]."


def _option(name: str, annotation: type, default: Any, help_text: str) -> inspect.Parameter:
    """A command's own option (not a config field): which SAE, model or device to use."""
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=typer.Option(default, help=help_text)
    )


MODEL = _option("model", str, None, "Host model (default: the SAE's model_name).")
HOOK = _option("hook", str, None, "Hook point (default: the SAE's hook_name).")
DEVICE = _option("device", str, "cpu", "Where the model and SAE run: cpu, cuda, ...")
TOKENIZER = _option("tokenizer", Path, None, TOKENIZER_HELP)


models_app = typer.Typer(no_args_is_help=True, help="Host models: list hook points, generate text.")
app.add_typer(models_app, name="models")


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


GENERATION_OPTIONS = options_for(GenerationConfig)
PROMPT = inspect.Parameter(
    "prompt",
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    annotation=str,
    default=typer.Argument(..., help="Text the model continues."),
)
PROMPT_TRACED = inspect.Parameter(
    "prompt",
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    annotation=str,
    default=typer.Argument(..., help="The text whose next token is traced."),
)


@models_app.command("generate")
@command(
    GENERATION_OPTIONS,
    [
        inspect.Parameter(
            "spec",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=str,
            default=typer.Argument(..., help=MODEL_SPEC_HELP),
        ),
        PROMPT,
        _option("tokenizer", Path, None, TOKENIZER_HELP),
    ],
)
def models_generate(spec: str, prompt: str, tokenizer: Path | None = None, **given: Any) -> None:
    """Print a continuation of PROMPT (greedy by default), streaming tokens as they come."""
    from nanosae.models import load_model

    gen = GenerationConfig(**parse(GENERATION_OPTIONS, given))
    model = load_model(spec, tokenizer=tokenizer)
    console.print(prompt, end="", style="bold", highlight=False)
    shown: list[int] = []

    def stream(step: int, token: int) -> None:
        before = model.tokenizer.decode(shown)
        shown.append(token)
        console.print(model.tokenizer.decode(shown)[len(before) :], end="", highlight=False)

    model.generate(prompt, **dataclasses.asdict(gen), callback=stream)
    console.print()


class TokenProgress:
    """A rich progress bar for long jobs: tokens done / total, tokens/s, ETA and a free-form note."""

    def __init__(self, description: str, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
            console=console,
            transient=False,
        )
        self.task = self.bar.add_task(description, total=total, rate="", note="")

    def __enter__(self) -> TokenProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def update(self, done: int, rate: float, note: str = "", total: int | None = None) -> None:
        self.bar.update(
            self.task, completed=done, total=total, rate=f"{rate:,.0f} tok/s" if rate > 0 else "", note=note
        )


COLLECT_OPTIONS = options_for(CollectConfig, repeat=("model",))


@app.command()
@command(COLLECT_OPTIONS)
def collect(**given: Any) -> None:
    """Collect activations into a sharded on-disk store. Re-run the same command to resume."""
    from nanosae.data import collect as run_collect

    settings = gather_data(parse(COLLECT_OPTIONS, given))
    models = settings.pop("model", None) or [CollectConfig.model]
    if len(models) > 2:
        raise ConfigError(f"--model given {len(models)} times; collect takes one model, or two to diff")
    cfg = CollectConfig(**settings, model=models[0])
    with TokenProgress("collect", cfg.tokens * len(models)) as bar:

        def show(p, offset: int = 0) -> None:
            bar.update(offset + p.tokens, p.tokens / max(p.seconds, 1e-9), f"{p.bytes_written / 1e6:,.0f} MB written")

        if len(models) == 2:
            from nanosae.data.collect import collect_pair

            pair = collect_pair(cfg, models[1], lambda name, p: show(p, 0 if name == "A" else cfg.tokens))
            stores = {f"{name} {hook}": store for name, by_hook in pair.items() for hook, store in by_hook.items()}
        else:
            stores = run_collect(cfg, progress=show)
    for name, store in stores.items():
        console.print(f"{name}: {len(store):,} tokens × {store.d_in} ({store.dtype}) in {store.path}")
    if len(models) == 2:
        console.print(f"diff them with: nanosae train --diff {cfg.out}/A/HOOK {cfg.out}/B/HOOK --out RUN")


TRAIN_OPTIONS = options_for(TrainConfig, sweep=SWEEPABLE, repeat=("acts", "hook"))
CROSSCODER = inspect.Parameter(
    "crosscoder",
    inspect.Parameter.KEYWORD_ONLY,
    annotation=bool,
    default=typer.Option(
        False, help="Train one crosscoder over all --hook (or --acts) values instead of one SAE each."
    ),
)
TRANSCODERS = _option(
    "transcoders",
    str,
    None,
    "Train one transcoder per layer (MLP input -> MLP output) from one "
    "forward pass: 'all' or layers like 0,5,10; the set (RUN/layer_L + transcoders.json) is what "
    "`nanosae trace --transcoders RUN` reads.",
)


def transcoder_layers(spec: str, model: str) -> list[int]:
    """'all' (every layer of the model) or a comma list of layers."""
    if spec == "all":
        from nanosae.models import load_model

        return list(range(load_model(model).n_layers))
    try:
        return sorted({int(part) for part in spec.split(",")})
    except ValueError:
        raise ConfigError(f"--transcoders {spec!r}: expected 'all' or layers like 0,5,10") from None


DIFF = inspect.Parameter(
    "diff",
    inspect.Parameter.KEYWORD_ONLY,
    annotation=tuple[str, str] | None,
    default=typer.Option(
        None,
        help="A_STORE B_STORE: a model-diffing crosscoder over one hook of two models (nanosae collect --model A "
        "--model B); BatchTopK unless --architecture says otherwise. Study it with `nanosae diff RUN`.",
    ),
)


CONTEXT = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)


def chosen(ctx: typer.Context, name: str) -> bool:
    """Whether an option was given on the command line (not left at its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


@app.command()
@command(TRAIN_OPTIONS, [CONTEXT, CROSSCODER, TRANSCODERS, DIFF])
def train(
    ctx: typer.Context,
    crosscoder: bool = False,
    transcoders: str | None = None,
    diff: tuple[str, str] | None = None,
    **given: Any,
) -> None:
    """Train SAEs from stores or straight from the model; several settings train together from one stream."""
    from nanosae.train import train as run_train
    from nanosae.train.sweep import expand_sweep, transcoder_set

    settings = gather_data(parse(TRAIN_OPTIONS, given))
    if diff:
        if settings.get("acts") or crosscoder or transcoders:
            raise ConfigError("--diff names both stores; leave out --acts, --crosscoder and --transcoders")
        settings["acts"] = list(diff)
        crosscoder = True
    if (diff or settings.get("versus")) and not chosen(ctx, "architecture"):  # Minder et al.'s choice for diffs
        settings["architecture"] = ["batchtopk"]
    if transcoders:
        layers = transcoder_layers(transcoders, settings.get("model", SourceConfig.model))
        cfgs = transcoder_set(settings, layers)
    else:
        cfgs = expand_sweep(settings, crosscoder=crosscoder)
    batch = cfgs[0].optim.batch_size
    steps = cfgs[0].optim.tokens // batch
    label = f"train {len(cfgs)} SAEs" if len(cfgs) > 1 else f"train {cfgs[0].sae.architecture}"
    with TokenProgress(label, steps) as bar:
        start: list[float] = []  # (first step seen, its time): wall-clock tokens/s over every SAE's work

        def show(p) -> None:
            m = p.metrics
            start[:] = start or [p.step, time.monotonic()]
            elapsed = time.monotonic() - start[1]
            rate = (p.step - start[0]) * batch / elapsed if elapsed > 0 else m["tokens_per_s"]
            bar.update(
                p.step,
                rate,
                f"loss {m['loss']:.3g} fvu {m['fvu']:.3f} l0 {m['l0']:.1f} dead {m['dead_fraction']:.1%}",
            )

        if transcoders:
            from nanosae.interp.transcoder_sets import train_set

            trained = train_set(cfgs, layers, progress=show)
            results, scores = trained.results, trained.scores
        else:
            results = run_train(cfgs, progress=show)
    for result in results:
        m = result.metrics
        console.print(
            f"saved {result.run_dir / 'sae'}  (fvu {m.get('fvu', float('nan')):.4f}, "
            f"l0 {m.get('l0', float('nan')):.1f}, dead {m.get('dead_fraction', 0):.2%})"
        )
    if transcoders:
        if scores["scored_on"] != "eval":
            console.print(
                "[yellow]the data has no held-out documents (every 20th); the set was scored on the "
                "training text, which flatters it[/yellow]"
            )
        if len(layers) < scores["model_layers"]:
            console.print(
                f"[yellow]a partial set ({len(layers)} of {scores['model_layers']} layers): the other MLPs stay "
                "nonlinear inside the frozen pass, so traces through them are approximations (train --transcoders "
                "all for exact graphs)[/yellow]"
            )
        kind = "cross-layer transcoder" if cfgs[0].sae.cross_layer else "transcoder set"
        console.print(
            f"{kind}: {trained.path}; every MLP replaced at once: CE-loss score "
            f"{scores['replacement_ce_score']:.3f} (CE {scores['ce_loss_clean']:.3f} clean, "
            f"{scores['ce_loss_replaced']:.3f} replaced, {scores['ce_loss_mlps_zeroed']:.3f} MLPs zeroed); "
            f"FVU by layer " + " ".join(f"{v:.2f}" for v in scores["fvu_by_layer"].values())
        )
        console.print(f'trace with: nanosae trace "PROMPT" --transcoders {trained.path}')


EVAL_OPTIONS = options_for(EvalConfig)
SAE_PATHS = inspect.Parameter(
    "paths",
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    annotation=list[Path],
    default=typer.Argument(
        None,
        help="Run directories or SAE files/dirs (several: evaluated on the same tokens). Needed except with "
        "--synthetic.",
    ),
)


@app.command("eval")
@command(
    EVAL_OPTIONS,
    [
        SAE_PATHS,
        MODEL,
        HOOK,
        _option(
            "out", Path, None, "Where report.html goes (default: the run directory, or the folder holding the SAEs)."
        ),
        DEVICE,
        TOKENIZER,
        _option(
            "synthetic",
            str,
            None,
            "Score against a synthetic ground truth instead of text: a preset (tiny, cpu, synthsaebench). Without "
            "SAEs, nanosae's TopK, BatchTopK, Matryoshka and JumpReLU are trained on its samples first.",
        ),
        _option("samples", str, "2M", "With --synthetic and no SAEs: training samples (one pass for all four)."),
    ],
)
def eval_cmd(
    paths: list[Path] | None = None,
    model: str | None = None,
    hook: str | None = None,
    out: Path | None = None,
    device: str = "cpu",
    tokenizer: Path | None = None,
    synthetic: str | None = None,
    samples: str = "2M",
    **given: Any,
) -> None:
    """Evaluate SAEs: FVU, L0, dead/dense latents, CE/KL with the SAE spliced in (--suite full: also absorption,
    sparse probing, explanation scores); writes eval.json (+ saebench/*.json) and report.html. --synthetic scores
    them (or trains them first) against known features: MCC, F1, recovered features, absorption."""
    from nanosae.eval.report import TABLE_KEYS
    from nanosae.eval.run import evaluate_paths
    from nanosae.interp.featuredb import explanation_score

    if synthetic is not None:
        return synthetic_eval(synthetic, paths or [], out, parse_count(samples, "--samples"), device)
    if not paths:
        raise ConfigError("give the SAEs to evaluate (run directories or SAE files), or --synthetic PRESET")
    cfg = EvalConfig(**gather_data(parse(EVAL_OPTIONS, given)))
    explained = lambda runs: [explanation_score(run.features if run else None) for run in runs]
    with TokenProgress("eval", cfg.tokens) as bar:  # the full suite's stages show as the bar's note
        results, names, report, spec = evaluate_paths(
            paths,
            cfg,
            model,
            hook,
            out,
            device,
            tokenizer,
            explanations=explained,
            progress=lambda done, total, sec: bar.update(done, done / max(sec, 1e-9)),
            status=lambda text: bar.update(cfg.tokens, 0.0, f"full suite: {text}"),
        )
    table = Table(title=f"{spec} · {results[0]['hook']} · {results[0]['tokens']:,} tokens")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    for key in TABLE_KEYS:
        table.add_row(key, *[f"{r[key]:.4g}" if isinstance(r[key], float) else str(r[key]) for r in results])
    for section, key in SUITE_KEYS if cfg.suite == "full" else ():
        table.add_row(f"{section}: {key}", *[_cell((r.get(section) or {}).get(key)) for r in results])
    console.print(table)
    console.print(f"report: {report}")


def synthetic_eval(preset: str, paths: list[Path], out: Path | None, samples: int, device: str) -> None:
    """eval --synthetic: the given SAEs (or nanosae's four, trained here) against the preset's true features."""
    from nanosae.eval.report import is_report
    from nanosae.eval.synthetic import SCORE_ROWS, run_synthetic
    from nanosae.outputs import check_file
    from nanosae.sae import SAE

    if out is None:
        raise ConfigError("--synthetic needs --out DIR: where eval.json, report.html (and trained SAEs) go")
    check_file(out / "report.html", "evaluation report", is_report)
    saes = {path.name: SAE.load(path, device=device) for path in paths} or None
    if saes is None:
        with TokenProgress("train on synthetic samples", samples) as bar:
            start = time.perf_counter()

            def show(p: Any) -> None:
                done = samples * p.step // max(p.steps, 1)
                bar.update(done, done / max(time.perf_counter() - start, 1e-9))

            results = run_synthetic(preset, out, samples, progress=show)
    else:
        results = run_synthetic(preset, out, samples, saes=saes)
    table = Table(title=f"synthetic ground truth: {preset}")
    table.add_column("score")
    for name in results:
        table.add_column(name, justify="right")
    for key in SCORE_ROWS:
        table.add_row(key, *[_cell(r.get(key)) for r in results.values()])
    console.print(table)
    console.print(f"report: {out / 'report.html'}")


SUITE_KEYS = [
    ("absorption", "mean_absorption_fraction_score"),
    ("absorption", "mean_full_absorption_score"),
    ("absorption", "mean_num_split_features"),
    ("sparse_probing", "llm_test_accuracy"),
    ("sparse_probing", "sae_top_1_test_accuracy"),
    ("sparse_probing", "sae_top_5_test_accuracy"),
    ("explanations", "explanation_score"),
    ("explanations", "latents_scored"),
]


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


FEATURES_OPTIONS = options_for(FeaturesConfig)
SAE_PATH = inspect.Parameter(
    "path",
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    annotation=Path,
    default=typer.Argument(..., help="Run directory or SAE file/dir (ours, SAELens, OpenAI)."),
)


@app.command()
@command(
    FEATURES_OPTIONS,
    [
        SAE_PATH,
        MODEL,
        HOOK,
        _option("out", Path, None, "Database file (default: RUN/features.db; a diff built on A: features-A.db)."),
        _option(
            "acts",
            list[Path],
            None,
            "Read the SAE's input from this store (from `nanosae collect`) instead of running the model; the data "
            "options are then not used. A model-diffing crosscoder reads its two stores (default: its training "
            "pair) and shows the logit effects of --model's decoder (default: B's).",
        ),
        DEVICE,
        TOKENIZER,
    ],
)
def features(
    path: Path,
    model: str | None = None,
    hook: str | None = None,
    out: Path | None = None,
    acts: list[Path] | None = None,
    device: str = "cpu",
    tokenizer: Path | None = None,
    **given: Any,
) -> None:
    """Build features.db: densities, histograms, top and quantile examples, logit effects, co-firing (resumable)."""
    from nanosae.interp.diff import run_stores
    from nanosae.interp.features import build_features
    from nanosae.models import load_model
    from nanosae.rundir import RunDir, check_fit, home, locate, model_spec, own_home
    from nanosae.sae import SAE

    cfg = FeaturesConfig(**gather_data(parse(FEATURES_OPTIONS, given)))
    folder = out.parent if out else home(path)  # before loading anything: a Hub id needs --out
    run, sae_path = locate(path)
    sae = SAE.load(sae_path, device=device)
    models = sae.cfg.crosscoder_models
    if models:  # a diff: both stores, and B's side unless --model names A
        acts = acts or [Path(p) for p in run_stores(run or RunDir(folder))]
        model = model or models[-1]
    target = out or folder / ("features-A.db" if models and model == models[0] else "features.db")
    host = load_model(model_spec(sae, model, path), device=device, tokenizer=tokenizer)
    check_fit(sae, host, path)
    with TokenProgress("features", cfg.tokens) as bar:
        build_features(
            sae,
            host,
            cfg,
            target,
            hook=hook,
            acts=list(acts) if acts else None,
            home=own_home(path),
            progress=lambda done, total, sec: bar.update(done, done / max(sec, 1e-9)),
        )
    console.print(f"wrote {target}")


SAES = _option("sae", list[Path], ..., "SAE (run directory or file); repeatable to track several at once.")


@app.command()
@command(
    GENERATION_OPTIONS,
    [
        PROMPT,
        SAES,
        _option("top_features", int, 5, "Features shown per token and SAE."),
        _option("show_dense", bool, False, "Also show dense features (firing on over 5% of tokens in features.db)."),
        MODEL,
        DEVICE,
        TOKENIZER,
    ],
)
def track(
    prompt: str,
    sae: list[Path],
    top_features: int = 5,
    show_dense: bool = False,
    model: str | None = None,
    device: str = "cpu",
    tokenizer: Path | None = None,
    **given: Any,
) -> None:
    """Generate and show, live, the top features of every new token; a summary at the end."""
    from nanosae.interp.featuredb import dense_latents, explanations
    from nanosae.interp.live import FeatureTracker
    from nanosae.rundir import home, load_sae_and_model, locate
    from nanosae.sae import SAE

    gen = GenerationConfig(**parse(GENERATION_OPTIONS, given))
    _, first, host = load_sae_and_model(sae[0], model, device, tokenizer)
    saes: dict[str, SAE] = {}
    labels: dict[tuple[str, int], str] = {}
    hidden: dict[str, set[int]] = {}
    for i, p in enumerate(sae):
        name = p.name if len(sae) > 1 else "sae"
        saes[name] = first if i == 0 else SAE.load(locate(p)[1], device=device)
        labels |= {(name, latent): text for latent, text in explanations(home(p) / "features.db").items()}
        hidden[name] = set() if show_dense else dense_latents(home(p) / "features.db")
    tracker = FeatureTracker(host, saes, top_k=top_features, labels=labels, hidden=hidden)

    def show(t) -> None:
        feats = "  ".join(f"{f.latent}:{f.activation:.2f}" + (f" ({f.label})" if f.label else "") for f in t.features)
        console.print(f"[bold]{t.text!r:>14}[/bold]  {feats}", highlight=False)

    out = tracker.generate(prompt, callback=show, **dataclasses.asdict(gen))
    console.print(f"\n[bold]{prompt}[/bold]{out.text}\n", highlight=False)
    table = Table(title="most active features")
    for col in ("sae", "latent", "tokens active", "max activation", "label"):
        table.add_column(col)
    for f, count in tracker.summary():
        table.add_row(f.sae, str(f.latent), str(count), f"{f.activation:.2f}", f.label or "")
    console.print(table)


@app.command()
@command(
    GENERATION_OPTIONS,
    [
        PROMPT,
        _option("sae", Path, ..., "SAE (run directory or file)."),
        _option(
            "feature",
            list[str],
            ...,
            "LATENT=+V adds V·W_dec, LATENT=-V subtracts, LATENT=V clamps, LATENT=0 ablates (repeatable).",
        ),
        MODEL,
        DEVICE,
        TOKENIZER,
    ],
)
def steer(
    prompt: str,
    sae: Path,
    feature: list[str],
    model: str | None = None,
    device: str = "cpu",
    tokenizer: Path | None = None,
    **given: Any,
) -> None:
    """Generate with and without feature edits (same seed) and show both side by side."""
    from nanosae.interp.live import parse_edit
    from nanosae.interp.live import steer as run_steer
    from nanosae.rundir import load_sae_and_model

    gen = GenerationConfig(**parse(GENERATION_OPTIONS, given))
    edits = [parse_edit(f) for f in feature]
    _, s, host = load_sae_and_model(sae, model, device, tokenizer)
    base, steered = run_steer(host, s, edits, prompt, **dataclasses.asdict(gen))
    table = Table(title=prompt, show_lines=True)
    table.add_column("baseline")
    table.add_column("steered: " + ", ".join(feature))
    table.add_row(base.text, steered.text)
    console.print(table)


def describe_node(n: dict[str, Any]) -> str:
    """A graph node in a line: a token, a feature (layer, latent, position, explanation), an error, a logit."""
    if n["feature_type"] == "embedding":
        return repr(n["clerp"])
    if n["feature_type"] == "logit":
        return n["clerp"]
    if n["feature_type"] == "mlp reconstruction error":
        return f"error L{n['layer']}@{n['ctx_idx']}"
    from nanosae.interp.circuits import node_key

    return f"L{n['layer']} #{node_key(n['node_id'])[1]}@{n['ctx_idx']}" + (f" {n['clerp']!r}" if n["clerp"] else "")


def show_diff_demo(result: dict[str, Any]) -> None:
    a, b = result["models"]
    c, p = result["counts"], result["probability"]
    console.print(
        f"{c['A-only']} A-only, {c['B-only']} B-only, {c['shared']} shared latents at {result['hook']} "
        f"(shared decoder rows: median cosine {result['shared_cosine_median']})"
    )
    word = result["word"]
    table = Table(
        title=f"The latents B writes most differently, added to A: P({word!r}) after held-out prompts "
        f"(A {p['A']:.4f}, B {p['B']:.4f})"
    )
    for col in ("rank", "latent", "relative norm", "change", "specificity", "fires on", f"P({word!r}) in A + latent"):
        table.add_column(col, justify="right")
    table.add_column("where it fires most (B's text)")
    for i, r in enumerate(result["b_side"], 1):
        table.add_row(
            str(i),
            str(r["latent"]),
            f"{r['relative_norm']:.3f}",
            f"{r['change']:.3f}",
            f"{r['specificity']:.3f}",
            f"{r['frequency']:.3%}",
            f"{r['word_probability']:.4f}",
            r["strongest"],
        )
    console.print(table)
    console.print(
        f"shared latents added the same way (control): median P({word!r}) {result['control_median']:.4f}; "
        f"the latent that moves A most toward B ranks {result['planted_rank']} of {len(result['b_side'])}"
    )
    t = result["together"]
    console.print(
        f"the top {len(t['latents'])} added at once: P({word!r}) {t['word_probability']:.4f} "
        f"(as many shared latents: {t['control']:.4f})"
    )
    console.print(f"seconds: {', '.join(f'{k} {v:.0f}' for k, v in result['seconds'].items())}; {result['out']}")


def show_circuits(result: dict[str, Any]) -> None:
    s, info = result["scores"], result["info"]
    console.print(
        f"transcoders: every MLP replaced at once, CE-loss score {s['replacement_ce_score']:.3f}; "
        f"FVU by layer {min(s['fvu_by_layer'].values()):.2f}..{max(s['fvu_by_layer'].values()):.2f}"
    )
    console.print("top logits: " + ", ".join(result["top_logits"]))
    console.print(
        f"graph: replacement score {info['replacement_score']:.3f}, completeness {info['completeness_score']:.3f}"
    )
    for score, path in result["paths"]:
        console.print(f"{score:.3f}  " + " -> ".join(describe_node(n) for n in path))
    console.print("time: " + " · ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items()))
    console.print(f"graph file: {result['graph']} (upload it to Neuronpedia, or: nanosae view {result['out']})")


TRACE_OPTIONS = options_for(TraceConfig)


@app.command()
@command(TRACE_OPTIONS, [PROMPT_TRACED])
def trace(prompt: str, **given: Any) -> None:
    """An attribution graph of a prompt over a transcoder set: saved in Neuronpedia's graph layout (the viewer
    shows it too), with its scores and the strongest paths to the top logit printed."""
    from nanosae.interp.circuits import strongest_paths
    from nanosae.interp.transcoder_sets import trace as run_trace

    cfg = TraceConfig(**parse(TRACE_OPTIONS, given))
    with TokenProgress("attribution (features)", cfg.max_feature_nodes) as bar:
        graph, data, out = run_trace(
            prompt,
            cfg,
            progress=lambda done, total: bar.update(done, 0.0, f"{done}/{total} features"),
            on_estimate=lambda need: console.print(f"memory this trace adds: about {need / 2**30:.2f} GiB"),
        )
    info = data["metadata"]["info"]
    console.print(
        "top logits: "
        + ", ".join(f"{graph.info['logit_strs'][t]!r} {p:.3f}" for t, p in zip(graph.logit_tokens, graph.logit_probs))
    )
    console.print(
        f"{graph.info['active_features']} active features ({graph.n_features} traced), "
        f"kept {len(data['nodes'])} nodes and {len(data['links'])} edges; replacement score "
        f"{info['replacement_score']:.3f}, completeness {info['completeness_score']:.3f}"
    )
    for score, path in strongest_paths(data, cfg.paths):
        console.print(f"{score:.3f}  " + " -> ".join(describe_node(n) for n in path))
    console.print(f"graph: {out}  (nanosae view {cfg.transcoders}; or upload the file to Neuronpedia)")


PRUNE_OPTIONS = options_for(PruneConfig)


@app.command()
@command(
    PRUNE_OPTIONS,
    [
        inspect.Parameter(
            "graph",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=Path,
            default=typer.Argument(..., help="A graph file `trace` wrote (its unpruned graph lies beside it)."),
        )
    ],
)
def prune(graph: Path, **given: Any) -> None:
    """Prune a traced graph again at other thresholds, without tracing again."""
    from nanosae.interp.transcoder_sets import reprune

    done = reprune(graph, PruneConfig(**parse(PRUNE_OPTIONS, given)))
    console.print(f"kept {len(done.data['nodes'])} nodes and {len(done.data['links'])} edges: {done.out}")


INTERVENE_OPTIONS = options_for(InterveneConfig)


@app.command()
@command(INTERVENE_OPTIONS, [PROMPT_TRACED])
def intervene(prompt: str, **given: Any) -> None:
    """Test a circuit hypothesis: set or scale features of a graph and compare the top next tokens and the
    continuation with the original."""
    from nanosae.interp.circuits import intervene as run_intervene
    from nanosae.interp.circuits import load_transcoders, parse_node_edit
    from nanosae.interp.transcoder_sets import host_spec
    from nanosae.models import load_model

    cfg = InterveneConfig(**parse(INTERVENE_OPTIONS, given))
    edits = [parse_node_edit(e) for e in cfg.edits]
    spec, tcs = load_transcoders(cfg.transcoders, cfg.device)
    host = load_model(host_spec(cfg.transcoders, spec, cfg.model), device=cfg.device)
    result = run_intervene(
        host,
        tcs,
        prompt,
        edits,
        max_new_tokens=cfg.max_new_tokens,
        freeze_attention=cfg.freeze_attention,
        constrained=cfg.constrained(host.n_layers),
    )
    table = Table(title=prompt, show_lines=True)
    table.add_column("original")
    table.add_column("edited: " + ", ".join(cfg.edits))
    for key in ("top", "continuation"):
        cells = [result[side][key] for side in ("original", "edited")]
        if key == "top":
            cells = ["  ".join(f"{t!r} {p:.3f}" for t, p in cell) for cell in cells]
        table.add_row(*cells)
    console.print(table)
    console.print("activations before: " + ", ".join(f"{k} {v:.3f}" for k, v in result["activations_before"].items()))
    console.print(
        "moved most downstream: " + (", ".join(f"{k} {a:.3f} -> {b:.3f}" for k, a, b in result["downstream"]) or "none")
    )


@app.command()
def diff(
    run: Path = typer.Argument(..., help="A run of `nanosae train --diff A_STORE B_STORE`."),
    acts: list[str] = typer.Option(None, help="The two stores (default: the ones the run was trained on)."),
    tokens: str = typer.Option("200k", help="Tokens of the stores latent scaling reads."),
    top: int = typer.Option(20, help="Latents listed per side."),
) -> None:
    """What each model has of its own: the crosscoder's latents by relative decoder norm (A-only, shared, B-only),
    with latent scaling to flag B-only latents that A carries too; writes RUN/diff.json and RUN/diff.html."""
    from nanosae.data.store import ActivationStore
    from nanosae.interp.diff import diff_report, paired_batches, render_diff, run_stores
    from nanosae.interp.featuredb import explanations
    from nanosae.io import atomic_write, write_json
    from nanosae.rundir import RunDir
    from nanosae.sae import SAE

    where = RunDir(run)
    sae = SAE.load(where.sae)
    paths = list(acts) if acts else run_stores(where)
    if len(paths) != 2:
        raise ConfigError(f"--acts given {len(paths)} times; expected A's store and B's store")
    stores = [ActivationStore(p) for p in paths]
    for store, model in zip(stores, sae.cfg.crosscoder_models or []):
        store.check(d_in=sae.cfg.d_in // 2, model=model)
    report = diff_report(sae, paired_batches(stores, parse_count(tokens, "--tokens")), top=top)
    labels = explanations(where.features) if where.features.exists() else {}
    write_json(where.path / "diff.json", report)
    page = render_diff(report, labels)
    atomic_write(where.path / "diff.html", lambda p: p.write_text(page, encoding="utf-8"))
    a, b = report["models"]
    c = report["counts"]
    console.print(f"{c['A-only']} {a}-only, {c['B-only']} {b}-only, {c['shared']} shared, {c['other']} other latents")
    for side, name in (("B-only", b), ("A-only", a)):
        table = Table(title=f"{name}-only latents, by specificity (1 − max ν)")
        for col in ("latent", "relative norm", "ν error", "ν reconstruction", "specificity", "fires on", "explanation"):
            table.add_column(col, justify="left" if col == "explanation" else "right")
        for r in report[side]:
            table.add_row(
                str(r["latent"]),
                f"{r['relative_norm']:.3f}",
                f"{r['nu_error']:.3f}",
                f"{r['nu_reconstruction']:.3f}",
                f"{r['specificity']:.3f}",
                f"{r['frequency']:.3%}",
                labels.get(r["latent"], ""),
            )
        console.print(table)
    table = Table(title=f"written most differently by {a} and {b} (change |d_B − d_A| / (|d_A| + |d_B|))")
    for col in ("latent", "relative norm", "cosine", "change", "fires on", "explanation"):
        table.add_column(col, justify="left" if col == "explanation" else "right")
    for r in report["changed"]:
        table.add_row(
            str(r["latent"]),
            f"{r['relative_norm']:.3f}",
            f"{r['cosine']:.3f}",
            f"{r['change']:.3f}",
            f"{r['frequency']:.3%}",
            labels.get(r["latent"], ""),
        )
    console.print(table)
    console.print(f"page: {where.path / 'diff.html'}")


VIEW_OPTIONS = options_for(ViewConfig)
RUN_VIEWED = inspect.Parameter(
    "run",
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    annotation=Path,
    default=typer.Argument(..., help="Run directory with features.db (and eval.json), or a transcoder set."),
)


@app.command()
@command(VIEW_OPTIONS, [RUN_VIEWED])
def view(run: Path, **given: Any) -> None:
    """Browse features: overview, feature pages, run text, steering playground (or --export a static site)."""
    from nanosae.viewer import create_app, export_static

    cfg = ViewConfig(**parse(VIEW_OPTIONS, given))
    if cfg.export is not None:
        out = export_static(run, cfg.export)
        console.print(f"static site written to {out} (open {out / 'index.html'})")
        return
    import uvicorn

    app_ = create_app(run, model=cfg.model, host=cfg.host, preload=True)
    console.print(f"nanosae viewer on http://{cfg.host}:{cfg.port}")
    uvicorn.run(app_, host=cfg.host, port=cfg.port, log_level="warning")


EXPLAIN_OPTIONS = options_for(ExplainConfig)
RUN_EXPLAINED = inspect.Parameter(
    "run",
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    annotation=Path,
    default=typer.Argument(..., help="Run directory (or features.db) to explain."),
)


@app.command()
@command(EXPLAIN_OPTIONS, [RUN_EXPLAINED])
def explain(run: Path, **given: Any) -> None:
    """Write an explanation and a held-out score for every feature into features.db."""
    from nanosae.interp.llm_explain import explain

    cfg = ExplainConfig(**parse(EXPLAIN_OPTIONS, given))
    if cfg.method == "llm" and not cfg.explainer_url:
        console.print(
            "[yellow]no --explainer-url: the run's own model explains, which tests the path, not the features "
            "(a 135M model writes noise); point --explainer-url at an OpenAI-compatible server (llama.cpp, "
            "Ollama, a hosted model) for explanations worth reading[/yellow]"
        )
    with TokenProgress("explain", 1) as bar:
        n = explain(run, cfg, progress=lambda done, total: bar.update(done, 0.0, total=total))
    console.print(f"explained {n} features in {run}")


export_app = typer.Typer(no_args_is_help=True, help="Export an SAE for other tools.")
app.add_typer(export_app, name="export")


EXPORT_OPTIONS = options_for(ExportConfig, skip=("model_id", "sae_set", "scan"))
NEURONPEDIA_OPTIONS = options_for(ExportConfig, skip=("scan",))
CIRCUIT_TRACER_OPTIONS = options_for(ExportConfig, skip=("model_id", "sae_set"))


def _run_argument(what: str) -> inspect.Parameter:
    return inspect.Parameter(
        "run", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path, default=typer.Argument(..., help=what)
    )


@export_app.command("saelens")
@command(EXPORT_OPTIONS, [_run_argument("Run directory or SAE directory/file.")])
def export_saelens_cmd(run: Path, **given: Any) -> None:
    """A plain SAELens-loadable directory (BatchTopK becomes JumpReLU with its threshold, as SAELens runs it)."""
    from nanosae.export.saelens import export_saelens

    console.print(f"wrote {export_saelens(run, ExportConfig(**parse(EXPORT_OPTIONS, given)).out)}")


@export_app.command("sparsify")
@command(EXPORT_OPTIONS, [_run_argument("Run directory or SAE (a TopK SAE or transcoder).")])
def export_sparsify_cmd(run: Path, **given: Any) -> None:
    """Write a TopK SAE in EleutherAI sparsify's layout (OUT/HOOKPOINT/cfg.json + sae.safetensors)."""
    from nanosae.export.sparsify import export_sparsify

    console.print(f"wrote {export_sparsify(run, ExportConfig(**parse(EXPORT_OPTIONS, given)).out)}")


@export_app.command("circuit-tracer")
@command(CIRCUIT_TRACER_OPTIONS, [_run_argument("A transcoder set (the run directory of `train --transcoders`).")])
def export_circuit_tracer_cmd(run: Path, **given: Any) -> None:
    """Write a transcoder set (per-layer or cross-layer) in circuit-tracer's layout: config.yaml + safetensors."""
    from nanosae.export.circuit_tracer import export_circuit_tracer

    cfg = ExportConfig(**parse(CIRCUIT_TRACER_OPTIONS, given))
    console.print(f"wrote {export_circuit_tracer(run, cfg.out, scan=cfg.scan)}")


@export_app.command("neuronpedia")
@command(NEURONPEDIA_OPTIONS, [_run_argument("Run directory with sae/ and features.db.")])
def export_neuronpedia_cmd(run: Path, **given: Any) -> None:
    """Neuronpedia upload files: the SAE (SAELens format), dashboard batches, explanations, a README."""
    from nanosae.export.neuronpedia import export_neuronpedia

    cfg = ExportConfig(**parse(NEURONPEDIA_OPTIONS, given))
    console.print(
        f"wrote {export_neuronpedia(run, cfg.out, model_id=cfg.model_id, sae_set=cfg.sae_set)} (see its README.md)"
    )


DEMO_OPTIONS = options_for(DemoConfig)
CIRCUITS = inspect.Parameter(
    "circuits",
    inspect.Parameter.KEYWORD_ONLY,
    annotation=bool,
    default=typer.Option(
        False,
        help="The second demo: transcoders for every layer, their feature databases and a traced prompt (out "
        "defaults to runs/demo-circuits).",
    ),
)


DIFF_DEMO = _option(
    "diff",
    bool,
    False,
    "The model-diffing demo: fine-tune SmolLM2 to name a planted word, find it with a crosscoder, steer with it "
    "(out defaults to runs/diff-demo).",
)
VERSUS = _option("versus", str, None, "With --diff: diff --model against this model instead of a planted fine-tune.")


@app.command()
@command(DEMO_OPTIONS, [CIRCUITS, DIFF_DEMO, VERSUS])
def demo(circuits: bool = False, diff: bool = False, versus: str | None = None, **given: Any) -> None:
    """The whole path on SmolLM2 + Python's docs: collect, train, evaluate, features, explanations, steering."""
    from nanosae.demo import run_demo
    from nanosae.eval.report import TABLE_KEYS

    cfg = DemoConfig(**parse(DEMO_OPTIONS, given))
    out = Path(cfg.out)
    bars: dict[str, TokenProgress] = {}

    def show(stage: str, done: int, total: int, seconds: float) -> None:
        if stage not in bars:
            for bar in bars.values():
                bar.__exit__()
            bars[stage] = TokenProgress(stage, total).__enter__()
        bars[stage].update(done, done / seconds if seconds > 0 else 0.0, total=total)

    if diff or versus:
        from nanosae.diff_demo import DiffDemoConfig, run_diff_demo

        where = cfg.out if cfg.out != DemoConfig.out else DiffDemoConfig.out
        try:
            diffed = run_diff_demo(DiffDemoConfig(out=where, model=cfg.model, versus=versus), progress=show)
        finally:
            for bar in bars.values():
                bar.__exit__()
        show_diff_demo(diffed)
        return
    if circuits:
        from nanosae.demo import CircuitsDemoConfig, run_circuits_demo

        where = cfg.out if cfg.out != DemoConfig.out else CircuitsDemoConfig.out
        try:
            result = run_circuits_demo(CircuitsDemoConfig(out=where), progress=show)
        finally:
            for bar in bars.values():
                bar.__exit__()
        show_circuits(result)
        return
    try:
        result = run_demo(cfg, progress=show)
    finally:
        for bar in bars.values():
            bar.__exit__()
    m = result["metrics"]
    table = Table(
        title=f"SmolLM2-135M · {m['hook']} · TopK d_sae {m['d_sae']}, k {m['k']} · {m['tokens']:,} held-out tokens"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in TABLE_KEYS:
        table.add_row(key, f"{m[key]:.4g}" if isinstance(m[key], float) else str(m[key]))
    console.print(table)
    feats = Table(
        title="five interesting features (N2G explanations; detection score on held-out natural text, its 95% "
        "interval, and the active + silent windows it rests on)"
    )
    for col in (
        "feature",
        "fires",
        "density",
        "explanation",
        "score",
        "output effect, measured (logit lens agreement)",
    ):
        feats.add_column(col)
    for f in result["features"]:
        feats.add_row(
            str(f["id"]),
            str(f["fires"]),
            f"{f['density']:.2%}",
            f["explanation"],
            f"{f['score']:.2f} [{f['interval'][0]:.2f}, {f['interval'][1]:.2f}] n={f['windows'][0]}+{f['windows'][1]}",
            " ".join(repr(t) for t, _ in f["effect"].get("promoted", [])[:5])
            + (
                f" ({f['effect']['lens_top_overlap']}/10, r {f['effect']['lens_correlation']:.2f})"
                if "lens_top_overlap" in f["effect"]
                else f["effect"].get("note", "")
            ),
        )
    console.print(feats)
    st = result["steering"]
    if st:
        steer_table = Table(
            title=f"steering: feature {st['feature']} ({st['explanation']}) added with strength "
            f"{st['strength']:.1f} to {st['prompt']!r}",
            show_lines=True,
        )
        steer_table.add_column("baseline")
        steer_table.add_column("steered")
        steer_table.add_row(st["baseline"], st["steered"])
        console.print(steer_table)
        if not st.get("fluent", True):
            console.print(
                "[yellow]no feature moved the prompt toward its tokens and still read fluently; this is the "
                "strongest effect found[/yellow]"
            )
        console.print(
            f"next-token probability of the tokens it fires on ({' '.join(map(repr, st['tokens']))}): "
            f"{st['probability_before']:.2e} -> {st['probability_after']:.2e}",
            highlight=False,
        )
    console.print("time: " + " · ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items()))
    console.print(
        f"report: {out / 'report.html'}\nviewer: nanosae view {out}\n"
        f"static site: nanosae view {out} --export {out / 'site'}"
    )


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
