"""The feature database: what every latent responds to, from one streaming pass over text.

Per latent, with fixed-size accumulators (memory does not grow with the token count):
  density, mean and max activation, a histogram on fixed log-spaced bins
  top-N examples: the N windows with the largest activation, each shown around its strongest token with
      the latent's activation on every token (a running top-N merge per batch; one example per window)
  quantile examples: a uniform reservoir of firing windows (top-K by a random key, one firing token each),
      from which examples at evenly spaced activation quantiles are picked at the end
  co-firing: counts of tokens where two latents fire together (sparse products), top-10 by P(j | i)
  logit effects: W_dec[i] through the unembedding with the final norm's weight folded in, as
      TransformerLens's fold_ln does (the norm's scale is a positive per-token factor and is dropped)
Checkpointed every few batches; a rerun with the same settings resumes. The SQLite file is written to a
temp name and renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nanosae.config import DataConfig, check_fields, check_range
from nanosae.data.corpus import iter_documents
from nanosae.data.store import ActivationStore, check_same_tokens
from nanosae.data.tokens import in_background, token_batches
from nanosae.errors import DataError, first_line
from nanosae.interp.featuredb import is_features_db, write_db
from nanosae.io import write_lock
from nanosae.models import HostModel
from nanosae.outputs import check_file
from nanosae.sae import SAE

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")  # torch.sparse.mm below
HIST_EDGES = torch.logspace(-3, 3, 61)  # activation histogram bins (plus underflow/overflow)
CANDIDATES = 2  # top examples kept per example shown
SHARED_RUN = 8  # two windows sharing this many consecutive tokens show the same passage


@dataclass
class FeaturesConfig:
    """Build features.db for an SAE on a host model."""

    data: DataConfig = field(default_factory=lambda: DataConfig(specs=["builtin:pydocs"], split="all"))
    tokens: int = 100_000
    """Tokens to read (from the model, or from the store with --acts)."""
    top_n: int = 20
    """Top-activating examples kept per latent."""
    reservoir: int = 32
    """Random firing examples kept per latent, from which quantile examples are picked."""
    random_windows: int = 1024
    """Random windows of the text kept with every token's largest latents: natural text that explanations are
    built on (half) and scored on (the other half)."""
    quantile_examples: int = 8
    """Examples shown at evenly spaced activation quantiles, picked from the reservoir."""
    window_left: int = 12
    """Tokens of context before the activating token."""
    window_right: int = 4
    """Tokens of context after the activating token."""
    batch_size: int = 8
    """Windows per forward pass."""
    logit_top: int = 10
    """Output tokens each latent promotes (and suppresses) most, kept per latent."""
    cofiring_top: int = 10
    """Latents that fire together with each latent most often, kept per latent."""
    seed: int = 0
    """Seed of the reservoir's random keys."""
    checkpoint_every: int = 20
    """Batches between resume checkpoints."""

    def __post_init__(self) -> None:
        check_fields(self)
        for name in (
            "tokens",
            "top_n",
            "reservoir",
            "quantile_examples",
            "batch_size",
            "logit_top",
            "cofiring_top",
            "random_windows",
        ):
            check_range(name, getattr(self, name), 1)
        for name in ("window_left", "window_right"):
            check_range(name, getattr(self, name), 0, 1024)  # a window is what a page shows around a token
        check_range("checkpoint_every", self.checkpoint_every, 0)


class _Examples:
    """Per-latent best-K examples by a key, with their token windows and activations: (F, K, W)."""

    def __init__(self, n_latents: int, k: int, width: int):
        self.key = torch.full((n_latents, k), -math.inf)
        self.act = torch.zeros(n_latents, k)
        self.tokens = torch.zeros(n_latents, k, width, dtype=torch.int32)
        self.acts = torch.zeros(n_latents, k, width)

    def merge(self, key: Tensor, act: Tensor, tokens: Tensor, acts: Tensor) -> None:
        all_key = torch.cat([self.key, key], 1)
        best = all_key.topk(self.key.shape[1], dim=1).indices
        pick = lambda old, new: torch.cat([old, new], 1).gather(
            1, best if old.dim() == 2 else best[..., None].expand(-1, -1, old.shape[2])
        )
        self.key, self.act = pick(self.key, key), pick(self.act, act)
        self.tokens, self.acts = pick(self.tokens, tokens), pick(self.acts, acts)

    def state(self) -> dict[str, Tensor]:
        return {"key": self.key, "act": self.act, "tokens": self.tokens, "acts": self.acts}

    def load(self, state: dict[str, Tensor]) -> None:
        self.key, self.act, self.tokens, self.acts = state["key"], state["act"], state["tokens"], state["acts"]


class _RandomWindows:
    """A uniform sample of the text's windows (top-M by a random key), each with the largest latents of every
    token: the natural text explanations are built and scored on (a latent's activation on a token not kept
    here was below the C largest of that token, treated as zero)."""

    def __init__(self, m: int, width: int, c: int):
        self.key = torch.full((m,), -math.inf)
        self.tokens = torch.full((m, width), -1, dtype=torch.int32)
        self.idx = torch.zeros(m, width, c, dtype=torch.int32)
        self.val = torch.zeros(m, width, c)
        self.doc = torch.full((m,), -1, dtype=torch.long)  # the document each window is in

    def add(
        self, toks: Tensor, valid: Tensor, z: Tensor, gen: torch.Generator, left: int, right: int, docs: Tensor
    ) -> None:
        """The batch's rows cut into windows that do not overlap (tiles from a random offset), each kept when its
        centre token is one the pass reads; the sample keeps the windows with the largest random keys."""
        B, T = toks.shape
        width = left + 1 + right
        per_row = max(1, T // width)
        offset = torch.randint(0, max(1, T - per_row * width + 1), (B,), generator=gen)
        centre = (offset[:, None] + left + width * torch.arange(per_row)[None, :]).clamp(max=T - 1)  # (B, per_row)
        rows = torch.arange(B)[:, None].expand(-1, per_row)
        keep = valid[rows, centre]
        rows, t = rows[keep], centre[keep]
        if not len(rows):
            return
        key = torch.rand(len(rows), generator=gen)
        pos, inside = _window_positions(t, T, left, right)
        tokens = toks[rows[:, None], pos].masked_fill(~inside, -1).int()
        val, idx = z[rows[:, None], pos].topk(self.idx.shape[-1], dim=-1)  # (n, W, C)
        val = val.masked_fill(~inside[..., None], 0.0)
        best = torch.cat([self.key, key]).topk(len(self.key)).indices
        self.key = torch.cat([self.key, key])[best]
        self.tokens = torch.cat([self.tokens, tokens])[best]
        self.idx = torch.cat([self.idx, idx.int()])[best]
        self.val = torch.cat([self.val, val])[best]
        self.doc = torch.cat([self.doc, docs[rows, t]])[best]

    def state(self) -> dict[str, Tensor]:
        return {"key": self.key, "tokens": self.tokens, "idx": self.idx, "val": self.val, "doc": self.doc}

    def load(self, state: dict[str, Tensor]) -> None:
        self.key, self.tokens, self.idx, self.val = state["key"], state["tokens"], state["idx"], state["val"]
        self.doc = state.get("doc", torch.full_like(self.key, -1, dtype=torch.long))


def _window_positions(t: Tensor, length: int, left: int, right: int) -> tuple[Tensor, Tensor]:
    """The positions of the windows around positions t, (n, left+1+right), clamped into the row, and which of
    them lie inside it."""
    pos = t[:, None] + torch.arange(-left, right + 1)[None, :]
    inside = (pos >= 0) & (pos < length)
    return pos.clamp(0, length - 1), inside


def _windows(
    tok_BT: Tensor, z_BTF: Tensor, b: Tensor, t: Tensor, f: Tensor, left: int, right: int
) -> tuple[Tensor, Tensor]:
    """Token ids and latent-f activations of the windows around (b, t): (n, left+1+right), -1 padded."""
    pos, inside = _window_positions(t, tok_BT.shape[1], left, right)
    tokens = tok_BT[b[:, None], pos].masked_fill(~inside, -1).int()
    acts = z_BTF[b[:, None], pos, f[:, None]].masked_fill(~inside, 0.0)
    return tokens, acts


def lens_parts(model: HostModel, sae: SAE, latents: list[int] | None = None) -> tuple[Tensor, Tensor] | None:
    """(decoder rows, W_U with the final norm's weight folded in as TransformerLens's fold_ln does): their
    product is the logit lens of each latent. None when the SAE does not write at the residual width."""
    norm, W_U = model.unembed()
    W_U = W_U.detach().float()
    weight = getattr(norm, "weight", None)
    if weight is not None:
        W_U = weight.detach().float()[:, None] * W_U
    W_dec = sae.W_dec.detach().float()
    if latents is not None:
        W_dec = W_dec[latents]
    if sae.cfg.kind == "crosscoder":  # what a latent writes into the last layer it reconstructs, or a diff's
        W_dec = W_dec.chunk(sae.cfg.n_blocks, dim=1)[diff_side(sae, model)]  # block of the model given
    return (W_dec, W_U) if W_dec.shape[1] == W_U.shape[0] else None


def diff_side(sae: SAE, model: HostModel) -> int:
    """The block of a model-diffing crosscoder that belongs to `model` (A's: 0), else the last one (B's)."""
    models = sae.cfg.crosscoder_models or []
    return models.index(model.name) if model.name in models[:-1] else -1


def logit_effects(
    model: HostModel, sae: SAE, top: int, chunk: int = 256, latents: list[int] | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top boosted / suppressed output tokens of each decoder direction (or of `latents` only): (values, ids)
    for each side."""
    parts = lens_parts(model, sae, latents)
    if parts is None:  # e.g. a transcoder writing into the MLP's hidden layer
        empty = torch.zeros(len(latents) if latents is not None else sae.cfg.d_sae, 0)
        return empty, empty.long(), empty, empty.long()
    W_dec, W_U = parts
    ups, up_ids, downs, down_ids = [], [], [], []
    for i in range(0, len(W_dec), chunk):
        effect = W_dec[i : i + chunk] @ W_U
        v, idx = effect.topk(top, dim=1)
        ups.append(v)
        up_ids.append(idx)
        v, idx = (-effect).topk(top, dim=1)
        downs.append(-v)
        down_ids.append(idx)
    return torch.cat(ups), torch.cat(up_ids), torch.cat(downs), torch.cat(down_ids)


def _model_batches(
    model: HostModel, sae: SAE, hooks: list[str], cfg: FeaturesConfig, skip: int
) -> Generator[tuple[int, Tensor, Tensor, Tensor], None, None]:
    """(index, tokens (B, T), valid (B, T), SAE input (B, T, d_in)) from windows run through the model."""
    batches = in_background(
        token_batches(
            iter_documents(cfg.data),
            model.tokenizer,
            cfg.data.context_size,
            cfg.batch_size,
            cfg.data.pack,
            cfg.data.exclude_first,
        )
    )
    for i, batch in enumerate(batches):
        if i >= skip:
            _, cache = model.run_with_cache(batch.tokens.to(model.device), hooks, return_logits=False)
            yield i, batch.tokens, batch.valid, sae.gather_input(cache, hooks)


def _store_batches(
    stores: list[ActivationStore], cfg: FeaturesConfig, skip: int
) -> Generator[tuple[int, Tensor, Tensor, Tensor], None, None]:
    """The same from stores (one, or a diff's pair side by side): the first one's token ids rebuild the
    collection's windows (a window starts where the position does not grow), so no model pass is needed.
    Positions that were not stored hold BOS (window starts, document separators, padding), or -1 (unknown)
    among the first exclude_first."""
    store = stores[0]
    context = int(store.manifest.get("context_size") or 0)
    if context < 2:
        raise DataError(f"{store.path}: the store does not record its context size; build features from the model")
    bos = int(store.manifest.get("bos_id", -1))
    exclude_first = int((store.manifest.get("data") or {}).get("exclude_first", 0))
    ids = store.token_ids(0, min(len(store), cfg.tokens + cfg.batch_size * context))
    pos = ids[:, 1]
    starts = torch.cat(
        [torch.zeros(1, dtype=torch.long), (pos[1:] <= pos[:-1]).nonzero()[:, 0] + 1, torch.tensor([len(ids)])]
    )
    for i, r0 in enumerate(range(0, len(starts) - 1, cfg.batch_size)):
        if i < skip:
            continue
        bounds = starts[r0 : r0 + cfg.batch_size + 1]
        lo, hi = int(bounds[0]), int(bounds[-1])
        row = torch.repeat_interleave(torch.arange(len(bounds) - 1), bounds.diff())
        p = pos[lo:hi]
        tokens = torch.full((len(bounds) - 1, context), bos, dtype=torch.long)
        tokens[:, 1:exclude_first] = -1
        tokens[row, p] = ids[lo:hi, 0]
        valid = torch.zeros(tokens.shape, dtype=torch.bool)
        valid[row, p] = True
        x = torch.zeros(*tokens.shape, sum(s.d_in for s in stores))
        x[row, p] = torch.cat([s.tokens(lo, hi) for s in stores], 1)
        yield i, tokens, valid, x


@torch.no_grad()
def build_features(
    sae: SAE,
    model: HostModel,
    cfg: FeaturesConfig,
    out: str | Path,
    hook: str | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    acts: ActivationStore | str | Path | list[str | Path] | None = None,
    home: str | Path | None = None,
) -> Path:
    """Stream cfg.tokens tokens through model + SAE and write the feature database to `out`.

    acts: read the SAE's input from this store (collected with token ids) instead of running the model;
    the model then only decodes tokens and gives the logit effects, and cfg.data is not read. A model-diffing
    crosscoder reads its pair of stores (A's, B's); the logit effects are those of `model`'s decoder block.
    out must be new or an earlier features database, and not inside another job's directory than `home`
    (the SAE's run; default: the folder holding out)."""
    out = Path(out)
    if out.is_dir():
        raise DataError(f"{out} is a directory; expected the features database's file name (e.g. RUN/features.db)")
    out = check_file(out, "features database", is_features_db, home=Path(home) if home else Path(out).resolve().parent)
    with write_lock(out, directory=False):
        return _build_features(sae, model, cfg, out, hook, progress, acts)


def _build_features(
    sae: SAE,
    model: HostModel,
    cfg: FeaturesConfig,
    out: Path,
    hook: str | None,
    progress: Callable[[int, int, float], None] | None,
    acts: ActivationStore | str | Path | list[str | Path] | None,
) -> Path:
    opened = [
        a if isinstance(a, ActivationStore) else ActivationStore(a, verify=False)
        for a in (acts if isinstance(acts, list) else [] if acts is None else [acts])
    ]
    acts_store = opened[0] if opened else None
    hooks = _hooks_read(sae, model, hook, opened)
    sae.eval()
    state_path = out.with_name(out.name + ".partial.pt")
    fingerprint = {
        "cfg": asdict(cfg),
        "hook": ",".join(hooks),
        "d_sae": sae.cfg.d_sae,
        "model": model.name,
        "W_dec_sum": float(sae.W_dec.double().sum()),
        "acts": ",".join(str(a.path) for a in opened) or None,
    }
    acc = FeatureStats.resume(state_path, fingerprint) or FeatureStats(sae.cfg.d_sae, cfg)
    acc.bos = model.tokenizer.bos_id
    t0 = time.perf_counter()
    batches = (
        _store_batches(opened, cfg, acc.batches) if opened else _model_batches(model, sae, hooks, cfg, acc.batches)
    )
    for i, toks, valid, x in batches:
        if acc.n_tokens >= cfg.tokens:
            break
        acc.add(i, toks, valid, sae.encode(x).float().cpu() * valid[..., None])  # BOS/padding positions zeroed
        if progress is not None:
            progress(min(acc.n_tokens, cfg.tokens), cfg.tokens, time.perf_counter() - t0)
        if cfg.checkpoint_every and acc.batches % cfg.checkpoint_every == 0:
            acc.save(state_path, fingerprint)
    batches.close()  # stops and joins the prefetch thread before the database is written
    if acc.n_tokens == 0:
        raise DataError(f"no tokens from {acts_store.path if acts_store is not None else ', '.join(cfg.data.specs)}")
    if acts_store is not None:
        cfg = replace(
            cfg, data=DataConfig.from_dict(acts_store.manifest.get("data") or {"specs": [str(acts_store.path)]})
        )
    _write_db(out, sae, model, ",".join(hooks), cfg, acc)
    state_path.unlink(missing_ok=True)
    return out


def _hooks_read(sae: SAE, model: HostModel, hook: str | None, stores: list[ActivationStore]) -> list[str]:
    """The hooks the SAE's input comes from, checked against the model or the stores."""
    if hook and sae.cfg.kind != "sae":
        raise DataError(f"a {sae.cfg.kind} reads {sae.cfg.input_hooks}; --hook is for plain SAEs")
    models = sae.cfg.crosscoder_models
    if models:
        if len(stores) != 2:
            raise DataError(f"this crosscoder diffs {' and '.join(models)}: give their two stores (A's, then B's)")
        for one, name in zip(stores, models):
            one.check(d_in=sae.cfg.d_in // 2, model=name)
        check_same_tokens(stores[1:], stores[0])
        return [sae.cfg.hook_name]
    if len(stores) > 1:
        raise DataError(f"{len(stores)} stores given; one SAE reads one (two only for a model-diffing crosscoder)")
    store = stores[0] if stores else None
    if store is not None:
        if sae.cfg.n_blocks > 1:
            raise DataError(f"a crosscoder reads {len(sae.cfg.input_hooks)} hooks; build its features from the model")
        store.check(d_in=sae.cfg.d_in)
        wanted = hook or sae.cfg.hook_name
        if wanted and store.hook and store.hook != wanted:
            raise DataError(
                f"{store.path} holds {store.hook} activations but the SAE reads {wanted}; "
                "give the store of that hook (or --hook to override)"
            )
        return [hook or store.hook or sae.cfg.input_hooks[0]]
    hooks = [hook] if hook else sae.cfg.input_hooks
    if not all(hooks):
        raise DataError("the SAE does not say which hook it reads (cfg.hook_name); pass --hook")
    for h in hooks:
        model.parse_hook(h)
    if sum(model.hook_dim(h) for h in hooks) != sae.cfg.d_in:
        raise DataError(
            f"{', '.join(hooks)} have width {sum(model.hook_dim(h) for h in hooks)} but the SAE "
            f"expects d_in={sae.cfg.d_in}"
        )
    return hooks


class FeatureStats:
    """Everything the feature pass accumulates, in fixed-size tensors (memory does not grow with tokens)."""

    def __init__(self, d_sae: int, cfg: FeaturesConfig):
        width = cfg.window_left + 1 + cfg.window_right
        self.cfg, self.n_tokens, self.batches = cfg, 0, 0
        self.fires = torch.zeros(d_sae, dtype=torch.long)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64)
        self.act_max = torch.zeros(d_sae)
        self.hist = torch.zeros(d_sae, len(HIST_EDGES) + 1, dtype=torch.long)
        self.cofire = torch.zeros(d_sae, d_sae, dtype=torch.int32)
        # twice the examples shown: repeated passages (the same text at other corpus positions) are dropped at
        # the end, and the list still fills
        self.top = _Examples(d_sae, CANDIDATES * cfg.top_n, width)
        self.reservoir = _Examples(d_sae, cfg.reservoir, width)
        self.random = _RandomWindows(cfg.random_windows, width, min(64, d_sae))
        self.bos = -1  # set by the pass: documents are told apart by the BOS tokens between them
        self.docs = torch.zeros((), dtype=torch.long)  # documents started so far

    TENSORS = ("fires", "act_sum", "act_max", "hist", "cofire", "docs")

    def documents(self, toks: Tensor) -> Tensor:
        """(B, T) the document of every position, counted over the whole pass: a packed row continues the
        document of the row before it until a BOS inside it starts the next; an unpacked row is one document."""
        inside = (toks == self.bos) & (torch.arange(toks.shape[1]) >= 1)[None, :]
        if not self.cfg.data.pack:
            inside = torch.zeros_like(inside)
            inside[:, 0] = True  # every row its own document
        per_row = inside.long().cumsum(1)
        before = torch.cat([per_row.new_zeros(1), per_row[:, -1].cumsum(0)[:-1]])
        docs = self.docs + before[:, None] + per_row
        self.docs = self.docs + per_row[:, -1].sum()
        return docs

    def add(self, i: int, toks: Tensor, valid: Tensor, z: Tensor) -> None:
        """Batch i: its token ids (B, T), kept positions (B, T) and latents (B, T, F), zero where not kept."""
        F_, cfg = z.shape[-1], self.cfg
        b, t, f = z.nonzero(as_tuple=True)
        vals = z[b, t, f]
        self.n_tokens += int(valid.sum())
        self.fires += torch.bincount(f, minlength=F_)
        self.act_sum.index_add_(0, f, vals.double())
        self.act_max = torch.maximum(self.act_max, z.amax(dim=(0, 1)))
        bucket = torch.bucketize(vals, HIST_EDGES)
        self.hist.view(-1).index_add_(0, f * self.hist.shape[1] + bucket, torch.ones_like(bucket))
        # co-firing: for each token, every pair of its active latents
        S = torch.sparse_coo_tensor(
            torch.stack([b * z.shape[1] + t, f]),
            torch.ones_like(vals),
            (z.shape[0] * z.shape[1], F_),
            check_invariants=False,
        )
        co = torch.sparse.mm(S.t().coalesce(), S).coalesce()
        ij = co.indices()
        self.cofire.view(-1).index_add_(0, ij[0] * F_ + ij[1], co.values().round().int())
        # top-N by activation and the reservoir by a random key, both per latent and at most one per window:
        # each window (a row of the batch; rows never overlap) offers its best position by the key, so two
        # examples of a latent are never one passage re-centred on another of its tokens
        gen = torch.Generator().manual_seed(
            cfg.seed * 1_000_003 + i
        )  # per batch, so a resumed pass draws the same keys
        random_keys = torch.rand(z.shape, generator=gen).masked_fill(z <= 0, -math.inf)
        for examples, key_all in ((self.top, z), (self.reservoir, random_keys)):
            row_key, row_pos = key_all.max(dim=1)  # (B, F): each window's best key and where it is
            k = min(examples.key.shape[1], z.shape[0])
            key, bb = row_key.T.topk(k, dim=1)  # (F, k) windows
            lat = torch.arange(F_)[:, None].expand(-1, k)
            tt = row_pos.T.gather(1, bb)
            act = z[bb, tt, lat]
            tokens, win_acts = _windows(
                toks, z, bb.reshape(-1), tt.reshape(-1), lat.reshape(-1), cfg.window_left, cfg.window_right
            )
            key = key.masked_fill(act <= 0, -math.inf)
            width = tokens.shape[-1]
            examples.merge(key, act, tokens.view(F_, k, width), win_acts.view(F_, k, width))
        self.random.add(toks, valid, z, gen, cfg.window_left, cfg.window_right, self.documents(toks))
        self.batches = i + 1

    def save(self, path: Path, fingerprint: dict[str, Any]) -> None:
        from nanosae.io import atomic_write

        state = {
            "fingerprint": json.dumps(fingerprint),
            "n_tokens": self.n_tokens,
            "batches": self.batches,
            "top": self.top.state(),
            "reservoir": self.reservoir.state(),
            "random": self.random.state(),
            **{name: getattr(self, name) for name in self.TENSORS},
        }
        atomic_write(path, lambda p: torch.save(state, p))

    @classmethod
    def resume(cls, path: Path, fingerprint: dict[str, Any]) -> FeatureStats | None:
        """The partial pass saved at path when it was made with the same settings, SAE and data; else None (an
        unreadable state is reported and the pass starts over)."""
        if not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if json.loads(state["fingerprint"]) != fingerprint:
                return None
            cfg = FeaturesConfig(**{**fingerprint["cfg"], "data": DataConfig.from_dict(fingerprint["cfg"]["data"])})
            acc = cls(fingerprint["d_sae"], cfg)
            acc.n_tokens, acc.batches = int(state["n_tokens"]), int(state["batches"])
            for name in cls.TENSORS:
                setattr(acc, name, state[name])
            acc.top.load(state["top"])
            acc.reservoir.load(state["reservoir"])
            acc.random.load(state["random"])
            if "doc" not in state["random"]:  # a pass saved before documents were recorded: start over
                return None
        except Exception as e:  # torch.load raises many kinds for truncated or corrupt files
            log.warning("%s is unreadable (%s); the feature pass starts over", path, first_line(e))
            return None
        log.info("resuming the feature pass at %d tokens", acc.n_tokens)
        return acc


def readable(decode: Callable[[list[int]], str], ids: list[int], piece: Callable[[int], str]) -> list[str]:
    """Each token's text, with the byte-level pieces of one character (a UTF-8 sequence split over tokens,
    shown as '\ufffd' alone) merged into the first of them and the others left empty, so text and activations
    stay aligned token by token."""
    out = [piece(i) for i in ids]
    n = 0
    while n < len(ids):
        if "\ufffd" in out[n] and ids[n] >= 0:
            for end in range(n + 2, min(n + 4, len(ids)) + 1):  # a UTF-8 character is at most 4 bytes
                if min(ids[n:end]) < 0:
                    break
                text = decode(ids[n:end])
                if "\ufffd" not in text:
                    out[n:end] = [text] + [""] * (end - n - 1)
                    n = end - 1
                    break
        n += 1
    return out


def _write_db(out: Path, sae: SAE, model: HostModel, hook: str, cfg: FeaturesConfig, acc: FeatureStats) -> None:
    """The accumulated statistics as database rows: per latent its summary and examples, decoded to text."""
    vocab: dict[int, str] = {}

    def piece(i: int) -> str:
        if i not in vocab:
            vocab[i] = model.tokenizer.decode([i]) if i >= 0 else ""
        return vocab[i]

    def text(ids: list[int]) -> list[str]:
        return readable(model.tokenizer.decode, ids, piece)

    meta = {
        "hook": hook,
        "kind": sae.cfg.kind,
        "hook_out": ",".join(sae.cfg.output_hooks),
        "model": model.name,
        "d_sae": sae.cfg.d_sae,
        "d_in": sae.cfg.d_in,
        "tokens": acc.n_tokens,
        "architecture": sae.cfg.architecture,
        "hist_edges": HIST_EDGES.tolist(),
        "window_left": cfg.window_left,
        "data": cfg.data.specs,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_db(
        out,
        meta,
        _latent_rows(sae, model, cfg, acc, piece),
        _example_rows(cfg, acc, text),
        _random_window_rows(acc, text),
    )


def _latent_rows(
    sae: SAE, model: HostModel, cfg: FeaturesConfig, acc: FeatureStats, piece: Callable[[int], str]
) -> list[tuple]:
    effects = logit_effects(model, sae, cfg.logit_top)  # up values, up ids, down values, down ids
    p_given = acc.cofire.double() / acc.cofire.diagonal().double().clamp_min(1)[:, None]
    p_given.fill_diagonal_(-1)
    co = p_given.topk(min(cfg.cofiring_top, sae.cfg.d_sae), dim=1)
    # plain lists: per-element tensor indexing in this loop cost more than the feature pass itself
    co_v, co_i, up_v, up_i, down_v, down_i, fires, act_sum, act_max, hist = (
        t.tolist() for t in (co.values, co.indices, *effects, acc.fires, acc.act_sum, acc.act_max, acc.hist)
    )
    rows = []
    for i in range(sae.cfg.d_sae):
        n = int(fires[i])
        cofiring = [[j, round(v, 4)] for j, v in zip(co_i[i], co_v[i]) if v > 0]
        rows.append(
            (
                i,
                n / acc.n_tokens,
                n,
                act_sum[i] / max(n, 1),
                act_max[i],
                json.dumps(hist[i]),
                json.dumps([[piece(t), round(v, 4)] for t, v in zip(up_i[i], up_v[i])]),
                json.dumps([[piece(t), round(v, 4)] for t, v in zip(down_i[i], down_v[i])]),
                json.dumps(cofiring),
                None,
                None,
                None,
                None,
                None,
                None,
            )
        )
    return rows


def _random_window_rows(acc: FeatureStats, text: Callable[[list[int]], list[str]]) -> list[tuple]:
    """(id, tokens, latents): latents as one {latent: activation} object per token (firing latents only)."""
    rows = []
    kept = acc.random.key > -math.inf
    docs = acc.random.doc[kept].tolist()
    for n, (toks, idx, val) in enumerate(
        zip(acc.random.tokens[kept].tolist(), acc.random.idx[kept].tolist(), acc.random.val[kept].tolist())
    ):
        latents = [{str(i): round(v, 4) for i, v in zip(ii, vv) if v > 0} for ii, vv in zip(idx, val)]
        rows.append((n, json.dumps(text(toks)), json.dumps(latents), docs[n]))
    return rows


def distinct(windows: list[list[int]], run: int = SHARED_RUN) -> list[int]:
    """Indices of the windows to keep, in order: each one unless it shares `run` consecutive tokens with a window
    kept before it (the same passage, found again at another place in the corpus). -1 is padding."""
    seen: set[tuple[int, ...]] = set()
    kept = []
    for n, toks in enumerate(windows):
        grams = {tuple(toks[j : j + run]) for j in range(len(toks) - run + 1) if min(toks[j : j + run]) >= 0}
        if grams & seen:
            continue
        seen |= grams
        kept.append(n)
    return kept


def _example_rows(cfg: FeaturesConfig, acc: FeatureStats, text: Callable[[list[int]], list[str]]) -> list[tuple]:
    """Top examples by rank, and quantile examples picked at evenly spaced activation ranks of the reservoir."""
    row = lambda i, kind, rank, act, toks, acts: (
        i,
        kind,
        rank,
        act,
        json.dumps(text(toks)),
        json.dumps([round(v, 4) for v in acts]),
        cfg.window_left,
        json.dumps(toks),  # the token ids, so the window can be run through the model again (output effects)
    )
    top = (acc.top.act.tolist(), acc.top.tokens.tolist(), acc.top.acts.tolist())
    res = (acc.reservoir.act.tolist(), acc.reservoir.tokens.tolist(), acc.reservoir.acts.tolist())
    examples = []
    for i in range(len(top[0])):
        act, toks, acts = (a[i] for a in top)
        kept = distinct([toks[r] for r in range(len(act)) if act[r] > 0])[: cfg.top_n]
        examples += [row(i, "top", rank, act[r], toks[r], acts[r]) for rank, r in enumerate(kept)]
        act, toks, acts = (a[i] for a in res)
        fired = sorted(distinct([toks[r] if act[r] > 0 else [] for r in range(len(act))]), key=lambda r: act[r])
        fired = [r for r in fired if act[r] > 0]
        if fired:
            n = cfg.quantile_examples
            picks = sorted({round(q * (len(fired) - 1) / max(1, n - 1)) for q in range(n)})
            examples += [
                row(i, "quantile", rank, act[fired[q]], toks[fired[q]], acts[fired[q]]) for rank, q in enumerate(picks)
            ]
    return examples
