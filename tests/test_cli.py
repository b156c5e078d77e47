import json
import sqlite3
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import nanosae
from nanosae import SAE, SAEConfig
from nanosae.cli import app


def test_info_prints_config_and_shapes(tmp_path):
    SAE(SAEConfig(d_in=8, d_sae=32, architecture="topk", k=4, hook_name="blocks.1.hook_resid_post")).save(tmp_path)
    result = CliRunner().invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for text in ("topk", "blocks.1.hook_resid_post", "W_enc", "(8, 32)", "W_dec", "(32, 8)"):
        assert text in result.output


def test_error_is_one_line_without_traceback(tmp_path):
    (tmp_path / "cfg.json").write_text("{broken")
    proc = subprocess.run(
        [sys.executable, "-c", "from nanosae.cli import main; main()", "info", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cfg.json is not valid JSON" in lines[0], proc.stderr


def test_collect_then_train_sweep(tiny_llama_dir, word_corpus, tmp_path):
    runner = CliRunner()
    acts = tmp_path / "acts"
    second = tmp_path / "more.txt"
    second.write_text("w5 w6 w7 " * 40)
    r = runner.invoke(
        app,
        [
            "collect",
            "--model",
            str(tiny_llama_dir),
            "--hook",
            "blocks.1.hook_resid_post",
            "--data",
            str(word_corpus),
            "--data",
            str(second),
            "--split",
            "all",
            "--tokens",
            "1k",
            "--out",
            str(acts),
            "--context-size",
            "16",
            "--dtype",
            "float32",
            "--tokens-per-shard",
            "256",
        ],
    )
    assert r.exit_code == 0, r.output
    store = nanosae.ActivationStore(acts / "blocks.1.hook_resid_post")
    assert len(store) == 1000 and store.manifest["data"]["split"] == "all"
    r = runner.invoke(
        app,
        [
            "train",
            "--acts",
            str(acts),
            "--d-sae",
            "32,64",
            "--k",
            "4",
            "--tokens",
            "5k",
            "--batch-size",
            "250",
            "--out",
            str(tmp_path / "sweep"),
            "--lr",
            "0.003",
        ],
    )
    assert r.exit_code == 0, r.output
    for size in (32, 64):
        sae = SAE.load(tmp_path / "sweep" / f"d_sae={size}" / "sae")
        assert (sae.cfg.d_sae, sae.cfg.k, sae.cfg.hook_name) == (size, 4, "blocks.1.hook_resid_post")
        assert sae.cfg.dataset_path == f"{word_corpus},{second}"  # every corpus of the collection, not the default


def test_parse_count():
    from nanosae.options import parse_count

    assert (parse_count("200k"), parse_count("2M"), parse_count("4096"), parse_count("1.5k")) == (
        200_000,
        2_000_000,
        4096,
        1500,
    )


def test_eval_command_writes_eval_json_and_report(tiny_llama_dir, word_corpus, tmp_path):
    runner = CliRunner()
    for name in ("a", "b"):
        sae = SAE(
            SAEConfig(
                d_in=32,
                d_sae=64,
                architecture="topk",
                k=4,
                hook_name="blocks.1.hook_resid_post",
                model_name=str(tiny_llama_dir),
            )
        )
        sae.save(tmp_path / "sweep" / name / "sae")
    r = runner.invoke(
        app,
        [
            "eval",
            str(tmp_path / "sweep" / "a"),
            str(tmp_path / "sweep" / "b"),
            "--data",
            str(word_corpus),
            "--tokens",
            "100",
            "--context-size",
            "16",
        ],
    )
    assert r.exit_code == 0, r.output
    for name in ("a", "b"):
        result = json.loads((tmp_path / "sweep" / name / "eval.json").read_text())
        assert 0 < result["tokens"] and "ce_loss_score" in result and result["hook"] == "blocks.1.hook_resid_post"
    assert (tmp_path / "sweep" / "report.html").exists() and "ce_loss_score" in r.output


def test_eval_full_suite_writes_sections_and_saebench_files(viewer_run, word_corpus, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(viewer_run, run)
    r = CliRunner().invoke(
        app,
        ["eval", str(run), "--suite", "full", "--data", str(word_corpus), "--tokens", "100", "--context-size", "16"],
    )
    assert r.exit_code == 0, r.output
    result = json.loads((run / "eval.json").read_text())
    # the tiny word-level tokenizer has no single-token English words and cannot read Python: said, not failed
    assert "single-token words" in result["absorption"]["note"] and "no usable" in result["sparse_probing"]["note"]
    assert result["explanations"] == {
        "explanation_score": 0.9,
        "explanation_score_std": 0.0,
        "latents_scored": 1,
        "latents_explained": 2,  # one of them on too little held-out evidence for a score
        "latents": 24,
        "methods": ["n2g"],
    }
    files = sorted(p.name for p in (run / "saebench").iterdir())
    assert files == ["autointerp.json", "core.json"]
    core = json.loads((run / "saebench" / "core.json").read_text())
    assert core["eval_type_id"] == "core" and core["eval_result_metrics"]["sparsity"]["l0"] == result["l0"]
    assert "explanations: explanation_score" in r.output
    task = tmp_path / "has_w7.jsonl"  # your own probing task: the built-in ones need real text, this one does not
    words = [[f"w{(7 * i + j) % 12 + 3}" for j in range(12)] for i in range(60)]
    task.write_text(
        "".join(json.dumps({"text": " ".join(w), "labels": [int(x == "w7") for x in w]}) + "\n" for w in words)
    )
    r = CliRunner().invoke(
        app,
        [
            "eval",
            str(run),
            "--suite",
            "full",
            "--data",
            str(word_corpus),
            "--tokens",
            "100",
            "--context-size",
            "16",
            "--probing-task",
            str(task),
        ],
    )
    assert r.exit_code == 0, r.output
    probing = json.loads((run / "eval.json").read_text())["sparse_probing"]
    assert set(probing["details"]) == {"has_w7"} and probing["details"]["has_w7"]["llm_test_accuracy"] > 0.9


def test_features_track_steer_commands(tiny_llama_dir, word_corpus, tmp_path):
    runner = CliRunner()
    SAE(
        SAEConfig(
            d_in=32,
            d_sae=16,
            architecture="topk",
            k=3,
            hook_name="blocks.1.hook_resid_post",
            model_name=str(tiny_llama_dir),
        )
    ).save(tmp_path / "run" / "sae")
    r = runner.invoke(
        app,
        [
            "features",
            str(tmp_path / "run"),
            "--data",
            str(word_corpus),
            "--tokens",
            "300",
            "--context-size",
            "16",
            "--top-n",
            "4",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "features.db").exists()
    r = runner.invoke(
        app,
        [
            "collect",
            "--model",
            str(tiny_llama_dir),
            "--hook",
            "blocks.1.hook_resid_post",
            "--data",
            str(word_corpus),
            "--tokens",
            "400",
            "--context-size",
            "16",
            "--dtype",
            "float32",
            "--out",
            str(tmp_path / "acts"),
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        [
            "features",
            str(tmp_path / "run"),
            "--acts",
            str(tmp_path / "acts"),
            "--tokens",
            "300",
            "--top-n",
            "4",
            "--out",
            str(tmp_path / "from_store.db"),
        ],
    )
    assert r.exit_code == 0, r.output
    meta = dict(sqlite3.connect(tmp_path / "from_store.db").execute("SELECT key, value FROM meta").fetchall())
    assert 300 <= json.loads(meta["tokens"]) <= 400 and json.loads(meta["data"]) == [str(word_corpus)]
    r = runner.invoke(app, ["track", "w5 w6 w7", "--sae", str(tmp_path / "run"), "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert "most active features" in r.output
    r = runner.invoke(
        app,
        [
            "steer",
            "w5 w6 w7",
            "--sae",
            str(tmp_path / "run"),
            "--feature",
            "3=+50",
            "--feature",
            "2=0",
            "--max-new-tokens",
            "4",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "baseline" in r.output and "steered" in r.output


def test_explain_and_export_commands(viewer_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(viewer_run, run)
    r = CliRunner().invoke(app, ["explain", str(run), "--method", "n2g"])
    assert r.exit_code == 0, r.output
    n = sqlite3.connect(run / "features.db").execute("SELECT COUNT(*) FROM latents WHERE method = 'n2g'").fetchone()[0]
    assert n > 0
    r = CliRunner().invoke(app, ["export", "neuronpedia", str(run), "--out", str(tmp_path / "np")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "np" / "batch-0.json").exists()
    r = CliRunner().invoke(app, ["export", "saelens", str(run), "--out", str(tmp_path / "sl")])
    assert r.exit_code == 0 and SAE.load(tmp_path / "sl").cfg.d_sae == 24


def test_every_option_has_help_and_the_configs_are_the_flags():
    """The generated options: every config field is a flag of its name, with the field's docstring as help."""
    import typer as typer_mod

    import nanosae.config as config_mod
    from nanosae.config import TrainConfig, config_leaves
    from nanosae.options import field_docs

    cmd = typer_mod.main.get_command(app)
    todo, missing = [("", cmd)], []
    while todo:
        path, c = todo.pop()
        if getattr(c, "commands", None):
            todo += [(f"{path} {n}", s) for n, s in c.commands.items()]
            continue
        missing += [(path, p.name) for p in c.params if not getattr(p, "help", None) and p.name != "help"]
    assert missing == []
    train_params = {p.name: p for p in cmd.commands["train"].params}
    for name, part, _ in config_leaves(TrainConfig):
        if name == "data":
            continue
        assert name in train_params, name
        owner = {"source": "SourceConfig", "sae": "DictionaryConfig", "optim": "OptimConfig"}.get(part, "TrainConfig")
        assert train_params[name].help.replace("\\[", "[") == field_docs(getattr(config_mod, owner))[name], name
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("nanosae ")


@pytest.mark.parametrize("cross_layer", [False, True])
def test_train_a_transcoder_set_then_trace(tiny_llama_dir, word_corpus, tmp_path, cross_layer):
    """train --transcoders all: one transcoder per layer from one stream (--cross-layer: also writing to every
    later MLP), a manifest; trace: a graph file in Neuronpedia's layout, its scores and paths printed, never
    overwritten; intervene from a graph node."""
    from nanosae.interp.circuits import load_transcoders

    runner = CliRunner()
    run = tmp_path / "tcs"
    trained = runner.invoke(
        app,
        [
            "train",
            "--transcoders",
            "all",
            "--model",
            str(tiny_llama_dir),
            "--data",
            str(word_corpus),
            "--context-size",
            "16",
            "--d-sae",
            "64",
            "--k",
            "4",
            "--tokens",
            "2k",
            "--batch-size",
            "250",
            "--out",
            str(run),
            "--lr",
            "0.003",
            "--skip-connection",
        ]
        + ["--cross-layer"] * cross_layer,
    )
    assert trained.exit_code == 0, trained.output
    manifest = json.loads((run / "transcoders.json").read_text())
    assert manifest["model"] == str(tiny_llama_dir) and manifest["layers"] == {str(L): f"layer_{L}" for L in range(3)}
    assert manifest["cross_layer"] == cross_layer
    later = load_transcoders(run)[1].later
    assert set(later) == ({0, 1} if cross_layer else set())
    assert all(rows.shape == (64, 2 - L, 32) and rows.abs().sum() > 0 for L, rows in later.items())  # learned, not 0
    for layer in range(3):
        tc = SAE.load(run / f"layer_{layer}" / "sae")
        assert (tc.cfg.hook_name, tc.cfg.hook_name_out) == (
            f"blocks.{layer}.ln2.hook_normalized",
            f"blocks.{layer}.hook_mlp_out",
        )
        assert tc.cfg.skip_connection
    r = runner.invoke(app, ["trace", "w5 w6 w7 w8", "--transcoders", str(run), "--max-feature-nodes", "40"])
    assert r.exit_code == 0, r.output
    graph = json.loads((run / "graphs" / "w5-w6-w7-w8.json").read_text())
    assert graph["metadata"]["prompt"] == "w5 w6 w7 w8" and graph["links"]
    assert "replacement score" in r.output and " -> " in r.output
    scores = json.loads((run / "replacement.json").read_text())
    assert set(scores["fvu_by_layer"]) == {"0", "1", "2"} and "replacement_ce_score" in scores
    assert "every MLP replaced at once" in " ".join(trained.output.split())
    node = next(n["node_id"] for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder")
    r = runner.invoke(
        app, ["intervene", "w5 w6 w7 w8", "--transcoders", str(run), "--set", f"{node}=10", "--max-new-tokens", "3"]
    )
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "original" in out and f"{node}=10" in out and "activations before" in out
    again = runner.invoke(app, ["trace", "w5 w6 w7 w8", "--transcoders", str(run)])
    assert again.exit_code != 0 and "exists" in str(again.exception)
    bad = runner.invoke(
        app, ["train", "--transcoders", "1,x", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "x")]
    )
    assert bad.exit_code != 0 and "expected 'all' or layers" in str(bad.exception)


def test_a_set_trained_on_too_few_documents_for_a_held_out_split_is_scored_on_its_text_and_says_so(
    tiny_llama_dir, tmp_path
):
    from tests.conftest import word_docs

    data = tmp_path / "five"
    data.mkdir()
    for i, doc in enumerate(word_docs(5, min_words=200, max_words=300)):
        (data / f"doc{i}.txt").write_text(doc)
    r = CliRunner().invoke(
        app,
        [
            "train",
            "--transcoders",
            "all",
            "--model",
            str(tiny_llama_dir),
            "--data",
            str(data),
            "--context-size",
            "16",
            "--d-sae",
            "16",
            "--k",
            "2",
            "--tokens",
            "1k",
            "--batch-size",
            "100",
            "--out",
            str(tmp_path / "set"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "scored on the training text" in " ".join(r.output.split())
    assert json.loads((tmp_path / "set" / "replacement.json").read_text())["scored_on"] == "all"


def test_a_partial_set_warns_and_sets_get_a_batch_floor(tiny_llama_dir, word_corpus, tmp_path):
    """Without --batch-size a set's step holds at least SET_BATCH_FLOOR tokens (each step runs the model for every
    layer); a set of some layers says its traces are approximations."""
    from nanosae.train.sweep import SET_BATCH_FLOOR, transcoder_set

    cfgs = transcoder_set({"tokens": 20_000}, [0, 1])
    assert [c.optim.batch_size for c in cfgs] == [SET_BATCH_FLOOR] * 2  # the single-SAE default would be 16
    assert transcoder_set({"tokens": 20_000, "batch_size": 32}, [0])[0].optim.batch_size == 32
    assert transcoder_set({"tokens": 100}, [0])[0].optim.batch_size == 100
    r = CliRunner().invoke(
        app,
        ["train", "--transcoders", "1", "--model", str(tiny_llama_dir), "--data", str(word_corpus)]
        + ["--context-size", "16", "--d-sae", "32", "--k", "4", "--tokens", "600", "--out", str(tmp_path / "s")],
    )
    assert r.exit_code == 0, r.output
    assert "a partial set (1 of 3 layers)" in " ".join(r.output.split())
