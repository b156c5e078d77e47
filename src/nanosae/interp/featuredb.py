"""features.db: the schema and every query nanosae makes of it (the feature pass writes it, explanations
update it, the viewer, the CLI, the demo and the exports read it).

    meta      key -> JSON value: hook, model, d_sae, tokens, hist_edges, window_left, data, ...
    latents   one row per latent: density, fires, mean/max activation, histogram, logit effects, co-firing,
              and the explanation with its detection score (balanced accuracy), precision, recall and
              method, or a note saying why there is none
    examples  top and quantile examples of each latent: token window, activation per token, focus position
    windows   random windows of the text with every token's firing latents ({latent: activation} per token):
              the non-activating text explanations are scored against
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import statistics
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

from nanosae.config import DENSE_THRESHOLD, MAX_LATENTS  # a features.db claiming more is damaged, not large
from nanosae.errors import FormatError
from nanosae.io import is_number, parse_json, public_mode

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE latents (id INTEGER PRIMARY KEY, density REAL, fires INTEGER, mean_act REAL, max_act REAL,
    histogram TEXT, top_logits TEXT, bottom_logits TEXT, cofiring TEXT, explanation TEXT, score REAL, method TEXT,
    precision REAL, recall REAL, note TEXT, score_low REAL, score_high REAL, n_active INTEGER, n_silent INTEGER,
    n_hard INTEGER, f1 REAL);
CREATE TABLE examples (latent INTEGER, kind TEXT, rank INTEGER, activation REAL, tokens TEXT, acts TEXT, focus INTEGER,
    ids TEXT);
CREATE INDEX examples_latent ON examples (latent, kind, rank);
CREATE TABLE windows (id INTEGER PRIMARY KEY, tokens TEXT, latents TEXT, doc INTEGER);
"""
# added after the first release: a database from before them gets them when it is next explained
SCORE_COLUMNS = {
    "precision": "REAL",
    "recall": "REAL",
    "note": "TEXT",
    "score_low": "REAL",
    "score_high": "REAL",
    "n_active": "INTEGER",
    "n_silent": "INTEGER",
    "n_hard": "INTEGER",
    "f1": "REAL",
}
EXPLANATION_FIELDS = (
    "explanation",
    "method",
    "note",
    "score",
    "score_low",
    "score_high",
    "precision",
    "recall",
    "f1",
    "n_active",
    "n_silent",
    "n_hard",
)  # what an explanation pass sets per latent
EXPLANATIONS_TABLE = (
    "CREATE TABLE explanations (latent INTEGER, method TEXT, explanation TEXT, note TEXT, score REAL, score_low REAL, "
    "score_high REAL, precision REAL, recall REAL, f1 REAL, n_active INTEGER, n_silent INTEGER, n_hard INTEGER, "
    "PRIMARY KEY (latent, method))"
)
LATENT_COLUMNS = (
    "id, density, fires, mean_act, max_act, histogram, top_logits, bottom_logits, cofiring, explanation, score, "
    "method, precision, recall, note"
)  # what the feature pass writes; the rest are the explanation's
SORTS = ("id", "density", "max_act", "mean_act", "score")


def is_features_db(path: Path) -> bool:
    """A file the features pass wrote: SQLite holding this module's tables (anything else is not replaced)."""
    try:
        with open(path, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                return False
        con = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        try:
            names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
        return {"meta", "latents", "examples"} <= names
    except (OSError, sqlite3.Error):
        return False


def db_path(path: str | Path) -> Path:
    """A run directory's features.db, or the file itself."""
    path = Path(path)
    return path / "features.db" if path.is_dir() else path


def open_db(path: str | Path, readonly: bool = True) -> sqlite3.Connection:
    """Open features.db (read-only by default: the viewer never writes), checking that it is one."""
    path = db_path(path)
    if not path.is_file():
        raise FormatError(f"{path} not found: build it with `nanosae features RUN --model M --data D`")
    # as_uri() percent-encodes '#' and '?', which would otherwise end the file name inside the URI
    uri = path.resolve().as_uri() + ("?mode=ro" if readonly else "?mode=rw")
    con = sqlite3.connect(uri, uri=True, check_same_thread=False)
    con.row_factory = sqlite3.Row
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as e:
        con.close()
        raise FormatError(f"{path} is not a features database ({e})") from None
    if not {"latents", "examples"} <= tables:
        con.close()
        raise FormatError(f"{path} is not a features database (no latents and examples tables)")
    return con


def write_db(
    out: Path, meta: dict[str, Any], latents: Iterable[tuple], examples: Iterable[tuple], windows: Iterable[tuple] = ()
) -> None:
    """Write a whole database to a temp file and rename it over `out` (a reader never sees half of one)."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp)
    try:
        con.executescript(SCHEMA)
        con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        con.executemany(f"INSERT INTO latents ({LATENT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", latents)
        con.executemany("INSERT INTO examples VALUES (?,?,?,?,?,?,?,?)", examples)
        con.executemany("INSERT INTO windows VALUES (?,?,?,?)", windows)
        con.commit()
    finally:
        con.close()
    public_mode(tmp)
    os.replace(tmp, out)


class FeatureDB:
    """Queries of one features.db; safe to share between threads (the viewer's requests)."""

    def __init__(self, path: str | Path, readonly: bool = True):
        self.path = db_path(path)
        self.con = open_db(self.path, readonly)
        self.lock = threading.Lock()

    def close(self) -> None:
        self.con.close()

    def rows(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self.lock:
            return self.con.execute(sql, args).fetchall()

    def meta(self) -> dict[str, Any]:
        """The meta table, checked: d_sae a sane positive integer, hist_edges a list of finite numbers."""
        try:
            meta = {
                r["key"]: parse_json(r["value"], f"{self.path} meta {r['key']}")
                for r in self.rows("SELECT key, value FROM meta")
            }
        except sqlite3.Error as e:
            raise FormatError(f"{self.path}: its meta table is unreadable ({e})") from None
        d_sae, edges = meta.get("d_sae"), meta.get("hist_edges")
        if not (isinstance(d_sae, int) and 0 < d_sae <= MAX_LATENTS):
            raise FormatError(
                f"{self.path}: meta d_sae is {str(d_sae)[:40]!r}, expected an integer in 1..{MAX_LATENTS}"
            )
        if not (
            isinstance(edges, list)
            and len(edges) >= 2
            and all(isinstance(e, (int, float)) and math.isfinite(e) for e in edges)
        ):
            raise FormatError(f"{self.path}: meta hist_edges must be a list of at least two finite numbers")
        return meta

    def cell(self, value: Any, what: str) -> Any:
        """A JSON column's value, or a one-line FormatError naming the database and the column."""
        if not isinstance(value, (str, bytes)):
            raise FormatError(f"{self.path}: {what} is {type(value).__name__}, expected JSON text")
        return parse_json(value, f"{self.path} {what}")

    def densities(self) -> list[float]:
        """Every latent's firing density, by id (a missing or non-numeric one counts as never firing)."""
        return [
            float(d) if isinstance(d := r["density"], (int, float)) and math.isfinite(d) else 0.0
            for r in self.rows("SELECT density FROM latents ORDER BY id")
        ]

    def dense(self) -> set[int]:
        """The latents firing on more than DENSE_THRESHOLD of tokens: shown apart, never first."""
        return {i for i, d in enumerate(self.densities()) if d > DENSE_THRESHOLD}

    def latent(self, latent: int) -> sqlite3.Row | None:
        found = self.rows("SELECT * FROM latents WHERE id = ?", (latent,))
        return found[0] if found else None

    def latents(self) -> list[sqlite3.Row]:
        return self.rows("SELECT * FROM latents ORDER BY id")

    def examples(self, latent: int) -> list[sqlite3.Row]:
        """Top examples by rank, then quantile examples by rank."""
        return self.rows("SELECT * FROM examples WHERE latent = ? ORDER BY kind DESC, rank", (latent,))

    def search(
        self, q: str = "", sort: str = "density", desc: bool = True, offset: int = 0, limit: int = 50
    ) -> tuple[int, list[sqlite3.Row]]:
        """(how many match, one page of them): q is a latent id, or text in explanations, output tokens or
        examples (one token's text, as stored)."""
        where, args = "", cast(tuple[Any, ...], ())  # the SQL's parameters, as many as it takes
        if q:
            if is_number(q.strip()):
                where, args = "WHERE id = ?", (min(int(q), 2**62),)
            else:  # explanations, output tokens, and the text of the latent's examples
                where = (
                    "WHERE explanation LIKE ? OR top_logits LIKE ? OR id IN "
                    "(SELECT latent FROM examples WHERE tokens LIKE ?)"
                )
                args = (f"%{q}%", f"%{q}%", f"%{json.dumps(q)[1:-1]}%")
        order = f"{sort if sort in SORTS else 'density'} {'DESC' if desc else 'ASC'}, id"
        total = self.rows(f"SELECT COUNT(*) AS n FROM latents {where}", args)[0]["n"]
        rows = self.rows(
            f"SELECT id, density, mean_act, max_act, explanation, score, top_logits FROM latents {where} "
            f"ORDER BY {order} LIMIT ? OFFSET ?",
            (*args, limit, offset),
        )
        return total, rows

    def focus_tokens(self, latent: int, n: int = 5) -> list[str]:
        """The distinct tokens a latent fires on most strongly (the focus of its top examples), best first."""
        out: list[str] = []
        for e in self.examples(latent):
            token = self.cell(e["tokens"], f"latent {latent} example tokens")[e["focus"]]
            if e["kind"] == "top" and token not in out:
                out.append(token)
        return out[:n]

    def explanations(self) -> dict[int, str]:
        return {
            r["id"]: r["explanation"]
            for r in self.rows("SELECT id, explanation FROM latents WHERE explanation IS NOT NULL")
        }

    def to_explain(
        self, most_frequent_first: bool = False, limit: int | None = None, min_fires: int = 1, max_density: float = 1.0
    ) -> list[sqlite3.Row]:
        """(id, fires, max_act) of the latents that fired at least min_fires times on at most max_density of the
        tokens, by id or most frequent first."""
        order = "fires DESC, id" if most_frequent_first else "id"
        dense = " AND density <= ?" if max_density < 1 else ""
        return self.rows(
            f"SELECT id, fires, max_act FROM latents WHERE fires >= ?{dense} ORDER BY {order}"
            + (f" LIMIT {int(limit)}" if limit else ""),
            (max(1, min_fires), *((max_density,) if dense else ())),
        )

    def set_explanations(self, updates: list[tuple]) -> None:
        """EXPLANATION_FIELDS rows, then the latent's id, in one transaction: all land, or none.

        Each method's explanations are kept apart (the explanations table: one row per latent and method, so an
        LLM pass never replaces N2G's, nor the other way round); the latents table shows, per latent, the
        explanation with the best stated score (one without a score only where none has one)."""
        fields = ", ".join(EXPLANATION_FIELDS)
        with self.lock, self.con:
            columns = {r["name"] for r in self.con.execute("PRAGMA table_info(latents)")}
            for name, kind in SCORE_COLUMNS.items():  # a database from before these columns gets them now
                if name not in columns:
                    self.con.execute(f"ALTER TABLE latents ADD COLUMN {name} {kind}")
            tables = {r["name"] for r in self.con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "explanations" not in tables:
                self.con.execute(EXPLANATIONS_TABLE)
                # explanations written before there was a table for them are kept as their method's
                self.con.execute(
                    f"INSERT INTO explanations (latent, {fields}) SELECT id, "
                    + ", ".join("COALESCE(method, 'n2g')" if f == "method" else f for f in EXPLANATION_FIELDS)
                    + " FROM latents WHERE explanation IS NOT NULL OR note IS NOT NULL"
                )
            marks = ", ".join("?" * (1 + len(EXPLANATION_FIELDS)))
            self.con.executemany(
                f"INSERT OR REPLACE INTO explanations (latent, {fields}) VALUES ({marks})",
                [(u[-1], *u[:-1]) for u in updates],
            )
            assignments = ", ".join(f"{name} = ?" for name in EXPLANATION_FIELDS)
            for (latent,) in {(u[-1],) for u in updates}:
                best = self.con.execute(
                    f"SELECT {fields} FROM explanations WHERE latent = ? ORDER BY score IS NULL, score DESC, "
                    "explanation IS NULL, method LIMIT 1",
                    (latent,),
                ).fetchone()
                self.con.execute(f"UPDATE latents SET {assignments} WHERE id = ?", (*best, latent))

    def explanations_of(self, latent: int) -> list[sqlite3.Row]:
        """Every method's explanation of a latent, best stated score first ([] for databases without them)."""
        tables = {r[0] for r in self.rows("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "explanations" not in tables:
            return []
        return self.rows(
            "SELECT * FROM explanations WHERE latent = ? ORDER BY score IS NULL, score DESC, method", (latent,)
        )

    def random_windows(self) -> list[tuple[list[str], list[dict[str, float]], int]]:
        """(tokens, {latent: activation} per token, document or -1) of the random windows ([] for databases
        without them)."""
        tables = {r[0] for r in self.rows("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "windows" not in tables:
            return []
        return [
            (
                self.cell(r["tokens"], "window tokens"),
                self.cell(r["latents"], "window latents"),
                int(r["doc"]) if "doc" in r.keys() and isinstance(r["doc"], int) else -1,
            )
            for r in self.rows("SELECT * FROM windows ORDER BY id")
        ]

    def explained(self, min_fires: int, max_density: float) -> list[sqlite3.Row]:
        """Latents with a scored explanation, enough firings and not dense: best score first, then most evidence."""
        return self.rows(
            "SELECT id, density, fires, max_act, explanation, score, score_low, score_high, n_active, n_silent, "
            "top_logits FROM latents WHERE explanation IS NOT NULL AND score IS NOT NULL AND fires >= ? "
            "AND density <= ? ORDER BY score DESC, fires DESC",
            (min_fires, max_density),
        )

    def best_explained(self, n: int, min_density: float, max_density: float) -> list[sqlite3.Row]:
        """The n best-scored explained latents whose density lies in [min_density, max_density]."""
        return self.rows(
            "SELECT id, density, max_act, explanation, score, top_logits FROM latents WHERE explanation "
            "IS NOT NULL AND density BETWEEN ? AND ? ORDER BY score DESC LIMIT ?",
            (min_density, max_density, n),
        )


def explanations(path: str | Path) -> dict[int, str]:
    """latent -> explanation of a features.db ({} when there is no database yet)."""
    if not db_path(path).exists():
        return {}
    db = FeatureDB(path)
    try:
        return db.explanations()
    finally:
        db.close()


def dense_latents(path: str | Path) -> set[int]:
    """The latents of a features.db firing on more than DENSE_THRESHOLD of tokens (none without a database)."""
    if not db_path(path).is_file():
        return set()
    fdb = FeatureDB(path)
    try:
        return fdb.dense()
    finally:
        fdb.close()


def explanation_score(db: Path | None) -> dict[str, Any]:
    """The evaluation's "explanations" section: mean detection score of the explanations in a features.db
    (balanced accuracy on held-out active and silent windows; see docs/interpretation.md), with how many latents
    were scored."""
    if db is None or not db.exists():
        return {"latents_scored": 0, "note": "no features.db: run `nanosae features` and `nanosae explain` first"}
    fdb = FeatureDB(db)
    try:
        rows = fdb.rows("SELECT score, method FROM latents WHERE score IS NOT NULL")
        total = fdb.rows("SELECT count(*) AS n FROM latents")[0]["n"]
        explained = fdb.rows("SELECT count(*) AS n FROM latents WHERE explanation IS NOT NULL")[0]["n"]
    finally:
        fdb.close()
    scores = [r["score"] for r in rows]
    methods = sorted({r["method"] for r in rows if r["method"]})
    if not scores:
        return {
            "latents_scored": 0,
            "latents": total,
            "note": "features.db holds no scored explanation: run `nanosae explain`",
        }
    return {
        "explanation_score": statistics.fmean(scores),
        "explanation_score_std": statistics.pstdev(scores),
        "latents_scored": len(scores),
        "latents_explained": explained,  # the rest of them on too little held-out evidence for a score
        "latents": total,
        "methods": methods,
    }
