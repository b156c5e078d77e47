"""The viewer: a FastAPI app over features.db plus a static front end (plain HTML/CSS/JS, no build step).

Read-only by construction: the database is opened with mode=ro, only viewer/static is served, every
query parameter is validated (a bad feature id is a 404 JSON answer), and the front end inserts all
corpus text with textContent, never as HTML. `export_static` writes the same pages with the API's
answers as JSON files, for hosting anywhere.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nanosae.config import DENSE_THRESHOLD
from nanosae.errors import FormatError, NanosaeError, first_line
from nanosae.interp.featuredb import FeatureDB
from nanosae.io import read_json
from nanosae.outputs import replacing_dir, resolved
from nanosae.rundir import RunDir, TranscoderSetDir, load_sae_and_model

STATIC = Path(__file__).parent / "static"
SIDE_EXAMPLES = 5  # top examples a diff crosscoder's feature page runs through both models


class ViewerData:
    """Everything the pages show, read from a run directory (features.db, eval.json)."""

    def __init__(self, run: str | Path):
        run = Path(run)
        self.run = run if run.is_dir() else run.parent
        self.db = FeatureDB(run)
        self.meta = self.db.meta()
        self.n_latents = int(self.meta["d_sae"])
        diff = RunDir(self.run).path / "diff.json"  # a model-diffing crosscoder's report (nanosae diff RUN)
        self.diff: dict[str, Any] | None = read_json(diff) if diff.exists() else None

    def overview(self) -> dict[str, Any]:
        metrics = {}
        eval_path = RunDir(self.run).eval
        if eval_path.exists():
            try:
                metrics = {k: v for k, v in read_json(eval_path).items() if isinstance(v, (int, float, str))}
            except FormatError as e:  # the overview still shows; the page says why the metrics are missing
                metrics = {"eval.json": first_line(e)}
        dens = self.db.densities()
        logs = [math.log10(d) for d in dens if d > 0]
        bins = [-7 + 0.25 * i for i in range(29)]
        counts = [sum(1 for v in logs if lo <= v < lo + 0.25) for lo in bins[:-1]]
        return {
            "meta": {k: v for k, v in self.meta.items() if k != "hist_edges"},
            "metrics": metrics,
            "density_hist": {"edges": bins, "counts": counts, "never_fired": len(dens) - len(logs)},
            "dense_threshold": DENSE_THRESHOLD,
            "diff": {k: self.diff[k] for k in ("models", "hook", "counts", "histogram", "shared_cosine_median")}
            if self.diff
            else None,
        }

    def features(
        self, q: str = "", sort: str = "density", desc: bool = True, offset: int = 0, limit: int = 50
    ) -> dict[str, Any]:
        total, rows = self.db.search(q, sort, desc, offset, limit)
        items = [
            {
                "id": r["id"],
                "density": r["density"],
                "mean_act": r["mean_act"],
                "max_act": r["max_act"],
                "explanation": r["explanation"],
                "score": r["score"],
                "top_logits": [t for t, _ in self.db.cell(r["top_logits"], "top_logits")[:5]],
            }
            for r in rows
        ]
        return {"total": total, "items": items}

    def feature_row(self, latent: int) -> dict[str, Any]:
        """A latent's page data, which a database with n_latents rows holds for every latent below it."""
        found = self.feature(latent)
        if found is None:
            raise FormatError(f"{self.run}: features.db has no row for latent {latent} of {self.n_latents}")
        return found

    def feature(self, latent: int) -> dict[str, Any] | None:
        r = self.db.latent(latent)
        if r is None:
            return None
        examples = [
            {
                "kind": e["kind"],
                "rank": e["rank"],
                "activation": e["activation"],
                "tokens": self.db.cell(e["tokens"], "example tokens"),
                "acts": self.db.cell(e["acts"], "example acts"),
                "focus": e["focus"],
            }
            for e in self.db.examples(latent)
        ]
        return {
            "id": latent,
            "density": r["density"],
            "fires": r["fires"],
            "mean_act": r["mean_act"],
            "max_act": r["max_act"],
            "histogram": {"edges": self.meta["hist_edges"], "counts": self.db.cell(r["histogram"], "histogram")},
            "top_logits": self.db.cell(r["top_logits"], "top_logits"),
            "bottom_logits": self.db.cell(r["bottom_logits"], "bottom_logits"),
            "cofiring": self.db.cell(r["cofiring"], "cofiring"),
            "explanation": r["explanation"],
            "score": r["score"],
            "precision": _get(r, "precision"),
            "recall": _get(r, "recall"),
            "note": _get(r, "note"),
            "method": r["method"],
            **{key: _get(r, key) for key in ("score_low", "score_high", "n_active", "n_silent", "n_hard", "f1")},
            "explanations": [dict(e) for e in self.db.explanations_of(latent)],  # every method's, side by side
            "examples": examples,
            "diff": {k: self.diff[k][latent] for k in ("relative_norm", "cosine", "change")}
            | {"models": self.diff["models"]}
            if self.diff
            else None,
        }


def _get(row: Any, key: str) -> Any:
    """A column that databases written before it was added do not have."""
    return row[key] if key in row.keys() else None


class LiveModel:
    """The host model and SAE for 'run text' and the steering playground, loaded on first use."""

    def __init__(self, run: Path, model: str | None):
        self.run, self.spec = run, model
        self.lock = threading.Lock()
        self.running = threading.Lock()
        self.loaded: tuple[Any, Any] | None = None
        self.pair_loaded: tuple[list[Any], Any] | None = None

    def get(self) -> tuple[Any, Any]:
        with self.lock:
            if self.loaded is None:
                _, sae, host = load_sae_and_model(self.run, self.spec)
                self.loaded = (host, sae)
            return self.loaded

    @contextlib.contextmanager
    def pair(self) -> Iterator[tuple[list[Any], Any]]:
        """A model-diffing crosscoder's two models (A, B) and the crosscoder, one request at a time."""
        from nanosae.models import load_model

        with self.lock:
            if self.pair_loaded is None:
                _, sae, host = load_sae_and_model(self.run, None)  # A: the crosscoder's model_name
                self.pair_loaded = ([host, load_model(sae.cfg.crosscoder_models[-1])], sae)
        with self.running:
            yield self.pair_loaded

    @contextlib.contextmanager
    def use(self) -> Iterator[tuple[Any, Any]]:
        """The model and SAE, one request at a time: requests run in a thread pool, and one's hooks (an ablation,
        a steering edit) must not reach another's forward pass."""
        loaded = self.get()
        with self.running:
            yield loaded


LOCAL_NAMES = ["localhost", "127.0.0.1", "[::1]"]
WILDCARD_BINDS = ("0.0.0.0", "::", "[::]", "")


def allowed_hosts(bind: str) -> list[str]:
    """Host headers the viewer answers: this machine's names and the bound address. A page on another site
    that rebinds its DNS name to 127.0.0.1 still sends its own name, and is refused (it could otherwise
    drive the API, which runs the model). Bound to every interface (--host 0.0.0.0), any name is accepted."""
    if bind in WILDCARD_BINDS:
        return ["*"]
    return LOCAL_NAMES + [f"[{bind}]" if ":" in bind else bind.lower()]


def create_app(run: str | Path, model: str | None = None, host: str = "127.0.0.1", preload: bool = False) -> Any:
    """The viewer's app; preload starts loading the host model and SAE in the background right away, so the
    first 'run text' or steering request does not wait for it.

    A transcoder set (`train --transcoders`: transcoders.json, layer_L/, graphs/) gets the graph pages instead:
    its root lists the graphs, each layer with a features.db is a whole viewer under /layer/L/."""
    from fastapi import Body, FastAPI, HTTPException, Query
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(title="nanosae viewer", docs_url=None, redoc_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(host), www_redirect=False)

    @app.exception_handler(RequestValidationError)
    def invalid(request: Any, exc: RequestValidationError) -> JSONResponse:
        """Say what was wrong without echoing the input back (a lone surrogate in it cannot even be encoded)."""
        where = lambda e: ".".join(str(part) for part in e.get("loc", ()))
        return JSONResponse(
            {"detail": "; ".join(f"{where(e)}: {e.get('msg', 'invalid')}" for e in exc.errors())}, status_code=422
        )

    @app.exception_handler(NanosaeError)
    def damaged(request: Any, exc: NanosaeError) -> JSONResponse:
        """A damaged file behind the page (features.db, eval.json, a graph): its one-line reason, no traceback."""
        return JSONResponse({"detail": str(exc)}, status_code=500)

    if is_transcoder_set(run):
        return _graph_app(app, Path(run), model, host)
    data = ViewerData(run)
    live = LiveModel(data.run, model)
    if preload:
        threading.Thread(target=live.get, daemon=True, name="nanosae-preload").start()

    @app.get("/api/overview")
    def overview() -> dict:
        return data.overview()

    @app.get("/api/features")
    def features(
        q: str = Query("", max_length=200),
        sort: str = Query("density", pattern="^(id|density|max_act|mean_act|score)$"),
        desc: bool = True,
        offset: int = Query(0, ge=0, le=2**62),
        limit: int = Query(50, ge=1, le=1_000_000),
    ) -> dict:
        return data.features(q, sort, desc, offset, limit)

    @app.get("/api/feature/{latent}")
    def feature(latent: int) -> dict:
        found = data.feature(latent) if 0 <= latent < data.n_latents else None
        if found is None:
            raise HTTPException(404, f"no feature {latent} (this SAE has 0..{data.n_latents - 1})")
        return found

    dense = data.db.dense()
    effects: dict[int, dict] = {}  # measured once per latent while the viewer runs

    @app.get("/api/feature/{latent}/effect")
    def effect(latent: int) -> dict:
        """The feature's measured output effect (ablated where it fires in its top examples), with the logit
        lens's agreement (interp.effects)."""
        from nanosae.interp.effects import effect_summary

        if not 0 <= latent < data.n_latents:
            raise HTTPException(404, f"no feature {latent} (this SAE has 0..{data.n_latents - 1})")
        if data.diff is not None:  # its latents are not spliced into one model
            return {"note": "a model-diffing crosscoder reads two models at once: see each model alone, above"}
        if latent not in effects:
            with live.use() as (host, sae):
                effects[latent] = effect_summary(host, sae, data.db, latent)
        return effects[latent]

    sides_cache: dict[int, dict] = {}

    @app.get("/api/feature/{latent}/sides")
    def sides(latent: int) -> dict:
        """A diff crosscoder's feature on its top examples as each model alone makes it fire (interp.diff)."""
        from nanosae.interp.diff import side_by_side

        if data.diff is None:
            raise HTTPException(404, "not a model-diffing crosscoder (no diff.json: run `nanosae diff RUN`)")
        if not 0 <= latent < data.n_latents:
            raise HTTPException(404, f"no feature {latent} (this SAE has 0..{data.n_latents - 1})")
        if latent not in sides_cache:
            windows = [data.db.cell(e["ids"], "example ids") for e in data.db.examples(latent) if e["kind"] == "top"]
            with live.pair() as (models, sae):
                sides_cache[latent] = {
                    "models": data.diff["models"],
                    "examples": side_by_side(models, sae, windows[:SIDE_EXAMPLES], latent),
                }
        return sides_cache[latent]

    @app.post("/api/run_text")
    def run_text(
        text: str = Body(..., embed=True, max_length=4000),
        top_k: int = Body(5, embed=True, ge=1, le=20),
        feature: int | None = Body(None, embed=True, ge=0, le=2**31),
        include_dense: bool = Body(False, embed=True),
    ) -> dict:
        """Each token's strongest features (dense ones left out unless asked for) and, for `feature`, its
        activation on every token (what the page colours the text by)."""
        import torch

        with live.use() as (host, sae):
            if feature is not None and feature >= sae.cfg.d_sae:
                raise HTTPException(422, f"no feature {feature} (this SAE has 0..{sae.cfg.d_sae - 1})")
            ids = host.prompt_ids(text)[:512]
            _, cache = host.run_with_cache(torch.tensor([ids]), sae.cfg.input_hooks, return_logits=False)
            with torch.no_grad():
                z = sae.encode(sae.gather_input(cache))[0]
        ranked = z if include_dense or not dense else z.index_fill(1, torch.tensor(sorted(dense)), 0.0)
        vals, idx = ranked.topk(min(top_k, z.shape[1]), dim=-1)
        tokens = [
            {
                "text": host.tokenizer.decode([t]),
                "features": [[int(i), round(float(v), 4)] for v, i in zip(vs, ix) if v > 0],
                **({"value": round(float(z[n, feature]), 4)} if feature is not None else {}),
            }
            for n, (t, vs, ix) in enumerate(zip(ids, vals, idx))
        ]
        return {"tokens": tokens[1:], "dense": sorted(dense)}

    @app.post("/api/steer")
    def steer_route(
        prompt: str = Body(..., embed=True, max_length=2000),
        edits: list = Body(..., embed=True),
        max_new_tokens: int = Body(24, embed=True, ge=1, le=128),
        temperature: float = Body(0.0, embed=True, ge=0.0, le=5.0),
        seed: int = Body(0, embed=True, ge=0, le=2**63 - 1),
    ) -> dict:
        from nanosae.errors import NanosaeError
        from nanosae.interp.live import Edit, steer

        try:
            parsed = [Edit(e["latent"], e["value"], e.get("mode", "add")) for e in edits]
        except (KeyError, TypeError, AttributeError):
            raise HTTPException(422, 'each edit is {"latent": int, "value": number, "mode": "add" | "clamp"}') from None
        except NanosaeError as e:
            raise HTTPException(422, str(e)) from None
        try:
            with live.use() as (host, sae):
                base, steered = steer(
                    host, sae, parsed, prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
                )
        except NanosaeError as e:
            raise HTTPException(422, str(e)) from None
        return {"baseline": base.text, "steered": steered.text}

    # last, so the API routes above win: everything else is a file of viewer/static and nothing outside it
    app.mount("/", StaticFiles(directory=STATIC, html=True), name="static")
    return app


def is_transcoder_set(run: str | Path) -> bool:
    return TranscoderSetDir(Path(run)).exists()


def _graph_app(app: Any, run: Path, model: str | None, host: str) -> Any:
    """Graph pages of a transcoder set: list, read, save pins and supernodes (into the graph file, atomically),
    feature summaries per layer, interventions; each layer with a features.db mounted as a viewer."""
    from fastapi import Body, HTTPException
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    from nanosae.errors import NanosaeError
    from nanosae.interp.circuits import intervene, load_transcoders, node_key, read_json_graph
    from nanosae.io import write_json
    from nanosae.models import load_model

    tset = TranscoderSetDir(run)
    layer_runs = tset.layer_runs()
    layers = {layer: ViewerData(d) for layer, d in sorted(layer_runs.items()) if (d / "features.db").is_file()}
    lock = threading.Lock()
    loaded: dict[str, Any] = {}

    def graph_file(slug: str) -> Path:
        if slug not in tset.graph_names():
            raise HTTPException(404, f"no graph {slug!r}")
        return tset.graph(slug)

    @app.get("/api/graphs")
    def list_graphs() -> dict:
        return {"graphs": tset.graph_names()}

    @app.get("/api/graph/{slug}")
    def graph(slug: str) -> dict:
        return read_json_graph(graph_file(slug))

    @app.put("/api/graph/{slug}/qparams")
    def save_qparams(
        slug: str,
        pinnedIds: list[str] = Body(..., max_length=10_000),
        supernodes: list[list[str]] = Body(..., max_length=1000),
    ) -> dict:
        path = graph_file(slug)
        with lock:
            data = read_json_graph(path)
            ids = {n["node_id"] for n in data["nodes"]}
            unknown = [i for i in pinnedIds + [m for g in supernodes for m in g[1:]] if i not in ids]
            if unknown or any(len(g) < 2 or not g[0].strip() or len(g[0]) > 200 for g in supernodes):
                raise HTTPException(
                    422,
                    f"unknown node {unknown[0][:60]!r}"
                    if unknown
                    else "a supernode is [name, node ids...] with a name of 1..200 characters and at least one node",
                )
            data["qParams"] |= {"pinnedIds": pinnedIds, "supernodes": supernodes}
            write_json(path, data)
        return data["qParams"]

    @app.get("/api/layer/{layer}/feature/{latent}")
    def layer_feature(layer: int, latent: int) -> dict:
        found = layers[layer].feature(latent) if layer in layers and 0 <= latent < layers[layer].n_latents else None
        if found is None:
            raise HTTPException(
                404,
                f"no feature page for layer {layer} latent {latent} (run `nanosae features` on "
                f"{layer_runs.get(layer, tset.layer(layer))})",
            )
        return found

    @app.post("/api/intervene")
    def intervene_route(
        slug: str = Body(..., embed=True),
        edits: list = Body(..., embed=True, max_length=64),
        max_new_tokens: int = Body(16, embed=True, ge=1, le=64),
    ) -> dict:
        data = read_json_graph(graph_file(slug))
        nodes = {n["node_id"]: n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"}
        try:
            parsed = [
                (node_key(e["node_id"]), e["op"], float(e["value"]))
                for e in edits
                if e["node_id"] in nodes and e["op"] in ("=", "*")
            ]
        except (KeyError, TypeError, ValueError):
            raise HTTPException(
                422, 'each edit is {"node_id": a feature node, "op": "=" | "*", "value": number}'
            ) from None
        if len(parsed) != len(edits):
            raise HTTPException(422, "edits name feature nodes of this graph, with op = or *")
        with lock:
            if not loaded:
                spec, tcs = load_transcoders(run)
                loaded.update(model=load_model(model or spec), tcs=tcs)
        try:
            return intervene(
                loaded["model"], loaded["tcs"], data["metadata"]["prompt"], parsed, max_new_tokens=max_new_tokens
            )
        except NanosaeError as e:
            raise HTTPException(422, str(e)) from None

    for layer, layer_data in layers.items():
        app.mount(f"/layer/{layer}", create_app(layer_data.run, model, host), name=f"layer-{layer}")

    @app.get("/")
    def root() -> FileResponse:
        return FileResponse(STATIC / "graph.html")

    app.mount("/", StaticFiles(directory=STATIC, html=True), name="static")
    return app


def export_static(run: str | Path, out: str | Path) -> Path:
    """Write the viewer as a static site: the front end plus the API's answers as JSON files.

    `out` must be new, empty, or an earlier export (outputs.check_dir); the site is built beside it and
    swapped in, so a directory holding anything else is refused and never touched."""
    graph_set = is_transcoder_set(run)
    data = None if graph_set else ViewerData(run)
    with replacing_dir(out, "viewer site", home=Path(run).resolve(), flag="--export") as tmp:
        if graph_set:
            _write_graph_site(Path(run), tmp)
        else:
            assert data is not None
            _write_site(data, tmp)
    return resolved(out)


CHUNK = 512  # features per data file of a static export: a few files, each loaded on first use


DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"  # app.js reads the same 64


def _digits(n: int, width: int) -> str:
    """n in base 64, `width` characters: a window's token indices as one short string."""
    return "".join(DIGITS[(n >> (6 * k)) & 63] for k in reversed(range(width)))


def _compact(value: Any) -> str:
    """JSON without spaces, every float to 4 significant digits (what the pages show)."""

    def rounded(v: Any) -> Any:
        if isinstance(v, float):
            return float(f"{v:.4g}")
        if isinstance(v, list):
            return [rounded(x) for x in v]
        if isinstance(v, dict):
            return {k: rounded(x) for k, x in v.items()}
        return v

    return json.dumps(rounded(value), separators=(",", ":"))


def _packed(f: dict[str, Any], strings: dict[str, int]) -> dict[str, Any]:
    """A feature page in few bytes (app.js's NANOSAE_UNPACK undoes it): histogram edges shared by all, logit
    effects to 3 decimals, examples as [is_top, activation, token indices, focus, then position and
    activation × 1000 of every token where the latent fires]."""
    f = dict(f, histogram=f["histogram"]["counts"])
    for side in ("top_logits", "bottom_logits"):
        f[side] = [[t, round(v, 3)] for t, v in f[side]]
    f["examples"] = [
        [
            int(e["kind"] == "top"),
            round(e["activation"], 4),
            [strings.setdefault(t, len(strings)) for t in e["tokens"]],
            e["focus"],
            *(x for p, a in enumerate(round(a * 1000) for a in e["acts"]) if a for x in (p, a)),
        ]
        for e in f["examples"]
    ]
    return f


def _write_graph_site(run: Path, out: Path) -> None:
    """A transcoder set's graphs as a static site: the graph page with every graph and, for their feature nodes,
    the explanation and top logits from the layers' features.db (no model: pins stay in the browser, and
    interventions need `nanosae view`)."""
    from nanosae.interp.circuits import node_key, read_json_graph

    shutil.copytree(STATIC, out, dirs_exist_ok=True)
    tset = TranscoderSetDir(run)
    layer_runs = tset.layer_runs()
    graphs = {slug: read_json_graph(tset.graph(slug)) for slug in tset.graph_names()}
    dbs: dict[int, ViewerData | None] = {}
    features = {}
    for graph in graphs.values():
        for node in graph["nodes"]:
            if node["feature_type"] != "cross layer transcoder":
                continue
            layer, latent, _ = node_key(node["node_id"])
            if layer not in dbs:
                where = layer_runs.get(layer)
                dbs[layer] = ViewerData(where) if where and (where / "features.db").is_file() else None
            db = dbs[layer]
            if db is not None and f"{layer}_{latent}" not in features:
                f = db.feature(latent)
                if f is not None:
                    features[f"{layer}_{latent}"] = {"explanation": f["explanation"], "top_logits": f["top_logits"][:5]}
    (out / "data").mkdir()
    (out / "data" / "graphs.js").write_text(
        f"window.NANOSAE_GRAPHS = {_compact(graphs)};\nwindow.NANOSAE_GRAPH_FEATURES = {_compact(features)};\n"
    )
    page = (out / "graph.html").read_text().replace("<body>", '<body data-mode="static">')
    page = page.replace('href="/style.css"', 'href="style.css"').replace(
        'src="/graph.js"', 'src="data/graphs.js"></script>\n<script src="graph.js"'
    )
    page = page.replace('href="/" class="brand"', 'href="index.html" class="brand"').replace(
        '<a href="/">graphs</a>', '<a href="index.html">graphs</a>'
    )
    (out / "index.html").write_text(page)
    (out / "graph.html").write_text(page)


def _write_site(data: ViewerData, out: Path) -> None:
    """The front end plus the API's answers as classic scripts (file:// pages may not fetch() JSON): the
    overview, the feature list, and the feature pages packed CHUNK to a file, each file's token strings
    stored once and referred to by index."""
    shutil.copytree(STATIC, out, dirs_exist_ok=True)
    (out / "data").mkdir()

    def put(name: str, script: str) -> None:
        (out / "data" / f"{name}.js").write_text(script)

    entry = lambda key, value: f"window.NANOSAE_DATA[{json.dumps(key)}] = {_compact(value)};\n"
    put("features", entry("features", data.features(limit=data.n_latents, sort="id", desc=False)))
    put(
        "overview",
        entry("overview", data.overview()) + f"window.NANOSAE_CHUNK = {CHUNK};\n"
        f"window.NANOSAE_HIST_EDGES = {json.dumps(data.meta['hist_edges'])};\n",
    )
    for start in range(0, data.n_latents, CHUNK):
        strings: dict[str, int] = {}
        feats = [_packed(data.feature_row(i), strings) for i in range(start, min(start + CHUNK, data.n_latents))]
        width = max(1, math.ceil(math.log(max(2, len(strings)), 64)))
        for f in feats:
            for e in f["examples"]:
                e[2] = "".join(_digits(i, width) for i in e[2])
        put(
            f"features-{start // CHUNK}",
            f"window.NANOSAE_UNPACK({_compact(list(strings))}, {width}, {_compact(feats)});\n",
        )
    # the page knows it is static by this marker and then reads data/*.js instead of /api
    index = (out / "index.html").read_text().replace('data-mode="api"', 'data-mode="static"')
    (out / "index.html").write_text(index)
