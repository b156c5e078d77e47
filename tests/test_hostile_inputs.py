"""Malformed files and CLI values: every one ends in exit code 1 and one line on stderr naming the file or
option, never a traceback, and nothing outside what the command writes is touched.

The CLI runs in this process (nanosae.cli.main with sys.argv set), so an unexpected exception fails the test
with its traceback instead of being printed. Property-based cases (Hypothesis) mutate valid cfg.json,
manifest.json and OpenAI .pt files at random.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import nanosae
from nanosae import SAE, SAEConfig
from nanosae.data import write_store
from nanosae.errors import NanosaeError

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    from nanosae.cli import main

    capsys.readouterr()
    old, sys.argv = sys.argv, ["nanosae", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(args: list[str], capsys, names: str, untouched: Path) -> None:
    """The command exits 1 with one stderr line containing `names`, and `untouched` is byte-identical."""
    before = tree(untouched)
    code, err = run_cli(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, (args, code, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], (args, err)
    assert tree(untouched) == before, args


def one_line_naming(e: NanosaeError, path: Path) -> None:
    message = str(e)
    assert message and "\n" not in message and str(path) in message, message


# ---- SAE files --------------------------------------------------------------------------------------------
def small_sae(tmp_path: Path, **cfg) -> Path:
    SAE(
        SAEConfig(**(dict(d_in=8, d_sae=16, architecture="topk", k=2, hook_name="blocks.1.hook_resid_post") | cfg))
    ).save(tmp_path / "sae")
    return tmp_path / "sae"


def edit_cfg(path: Path, change) -> None:
    cfg = json.loads((path / "cfg.json").read_text())
    (path / "cfg.json").write_text(json.dumps(change(cfg)))


@pytest.mark.parametrize(
    "change,names",
    [
        (lambda c: [1, 2], "cfg.json: expected a JSON object, found list"),
        (lambda c: None, "cfg.json: expected a JSON object, found NoneType"),
        (lambda c: c | {"activation_scale": "big"}, "activation_scale must be a finite number"),
        (lambda c: c | {"activation_scale": -2.0}, "activation_scale must be > 0"),
        (lambda c: c | {"matryoshka_groups": "abc", "architecture": "matryoshka"}, "matryoshka_groups must be"),
        (lambda c: c | {"d_sae": 10**9}, "tensor W_enc has shape (8, 16), expected (8, 1000000000)"),
        (lambda c: c | {"k": 2.5}, "k must be an integer"),
        (lambda c: c | {"architecture": ["topk"]}, "architecture must be a string"),
    ],
)
def test_malformed_cfg_json(tmp_path, capsys, change, names):
    path = small_sae(tmp_path)
    edit_cfg(path, change)
    refused(["info", path], capsys, names, tmp_path)
    refused(["info", path], capsys, str(path), tmp_path)


def test_nan_weights_are_refused(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    path = small_sae(tmp_path)
    tensors = load_file(path / "sae_weights.safetensors")
    tensors["W_dec"][3, 1] = float("nan")
    save_file(tensors, path / "sae_weights.safetensors")
    refused(["info", path], capsys, "tensor W_dec holds NaN or infinite values", tmp_path)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@SETTINGS
@given(
    key=st.sampled_from(
        [
            "d_in",
            "d_sae",
            "k",
            "architecture",
            "activation_scale",
            "output_scale",
            "d_out",
            "dtype",
            "hook_name",
            "normalize_activations",
            "matryoshka_groups",
            "apply_b_dec_to_input",
            "jumprelu_bandwidth",
            "context_size",
            "crosscoder_hooks",
            "hook_name_out",
            "activation_fn_kwargs",
            "metadata",
            "skip_connection",
        ]
    ),
    value=JSON,
)
def test_random_cfg_json_values_load_or_fail_in_one_line(tmp_path, key, value):
    path = small_sae(tmp_path) if not (tmp_path / "sae").exists() else tmp_path / "sae"
    original = (path / "cfg.json").read_text()
    try:
        edit_cfg(path, lambda c: c | {key: value})
        try:
            SAE.load(path)
        except NanosaeError as e:
            one_line_naming(e, path)
    finally:
        (path / "cfg.json").write_text(original)


def openai_dict(**change):
    sd = {
        "pre_bias": torch.zeros(8),
        "latent_bias": torch.zeros(16),
        "encoder.weight": torch.randn(16, 8),
        "decoder.weight": torch.randn(8, 16),
        "activation": "TopK",
        "activation_state_dict": {"k": 2},
    }
    return sd | change


@pytest.mark.parametrize(
    "content,names",
    [
        (openai_dict(**{"encoder.weight": torch.randn(16)}), "encoder.weight has shape (16,)"),
        (openai_dict(**{"encoder.weight": torch.ones(16, 8, dtype=torch.int64)}), "holds int64 values"),
        (openai_dict(activation_state_dict={"k": "many"}), "needs an integer k"),
        (openai_dict(**{"pre_bias": "zeros"}), "pre_bias is a str"),
        (openai_dict(activation_state_dict=[2]), "activation_state_dict is a list"),
        ([1, 2, 3], "got list"),
        (b"", "could not be read as a torch state dict"),
    ],
)
def test_malformed_openai_pt(tmp_path, capsys, content, names):
    path = tmp_path / "ae.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    refused(["info", path], capsys, names, tmp_path)
    refused(["info", path], capsys, str(path), tmp_path)


TENSORISH = st.one_of(
    JSON,
    st.builds(
        lambda shape, dtype: torch.zeros(tuple(shape), dtype=dtype),
        st.lists(st.integers(0, 17), max_size=3),
        st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]),
    ),
)


@SETTINGS
@given(
    key=st.sampled_from(
        [
            "pre_bias",
            "latent_bias",
            "encoder.weight",
            "decoder.weight",
            "activation",
            "activation_state_dict",
            "activation.k",
        ]
    ),
    value=TENSORISH,
)
def test_random_openai_entries_load_or_fail_in_one_line(tmp_path, key, value):
    path = tmp_path / "ae.pt"
    torch.save(openai_dict(**{key: value}), path)
    try:
        SAE.load(path)
    except NanosaeError as e:
        one_line_naming(e, path)


# ---- stores -------------------------------------------------------------------------------------------------
@pytest.fixture()
def store(tmp_path):
    return write_store(
        tmp_path / "acts", torch.randn(300, 8), hook="blocks.0.hook_resid_post", tokens_per_shard=100
    ).path


def edit_manifest(path: Path, change) -> None:
    m = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(change(m)))


@pytest.mark.parametrize(
    "change,names",
    [
        (lambda m: m | {"shards": []}, "the store holds no activations"),
        (lambda m: m | {"shards": "all"}, "'shards' must be a list"),
        (lambda m: m | {"dtype": "int8"}, "dtype 'int8' is not one of"),
        (lambda m: m | {"d_in": "wide"}, "d_in must be a positive integer"),
        (lambda m: m | {"shards": [m["shards"][0] | {"file": "/dev/zero"}]}, "shard 0 must name files"),
        (lambda m: m | {"shards": [m["shards"][0] | {"tokens": -5}]}, "shard 0 needs a positive 'tokens'"),
        (lambda m: [m], "manifest.json: expected a JSON object"),
        (lambda m: m | {"hook": ["blocks.0"]}, "hook must be str"),
        (lambda m: m | {"model": 7}, "model must be str"),
        (lambda m: m | {"context_size": -3}, "context_size must be a non-negative"),
        (lambda m: m | {"context_size": "long"}, "context_size must be int"),
        (lambda m: m | {"data": ["builtin:pydocs"]}, "data must be dict"),
        (lambda m: m | {"data": {"context_size": "x"}}, "data:"),
        (lambda m: m | {"norm_scale": 0}, "norm_scale must be positive"),
    ],
)
def test_malformed_manifest(tmp_path, capsys, store, change, names):
    edit_manifest(store, change)
    refused(["train", "--acts", store, "--out", tmp_path / "run", "--tokens", "1k"], capsys, names, store)
    assert not (tmp_path / "run" / "sae").exists()


@SETTINGS
@given(
    key=st.sampled_from(
        ["format", "dtype", "d_in", "tokens_per_shard", "shards", "hook", "context_size", "bos_id", "norm_scale"]
    ),
    value=JSON,
    shard_key=st.sampled_from(["file", "tokens", "sha256", "ids", "ids_sha256"]),
)
def test_random_manifest_values_open_or_fail_in_one_line(tmp_path, key, value, shard_key):
    path = tmp_path / "acts"
    if not path.exists():
        write_store(path, torch.randn(300, 8), tokens_per_shard=100)
    original = (path / "manifest.json").read_text()
    try:
        for change in (lambda m: m | {key: value}, lambda m: m | {"shards": [m["shards"][0] | {shard_key: value}]}):
            edit_manifest(path, change)
            try:
                s = nanosae.ActivationStore(path)
                s.tokens(0, len(s))
            except NanosaeError as e:
                one_line_naming(e, path)
            (path / "manifest.json").write_text(original)
    finally:
        (path / "manifest.json").write_text(original)


# ---- CLI values -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,names",
    [
        (["--tokens", "infk"], "'infk'"),
        (["--tokens", "1.5"], "'1.5'"),
        (["--d-sae", "0"], "d_sae must be ≥ 1"),
        (["--d-sae", "-4"], "d_sae must be ≥ 1"),
        (["--k", "1.5"], "'1.5'"),
        (["--k", "64"], "k (64) must be at most d_sae (32)"),
        (["--lr", "-1"], "lr must be > 0"),
        (["--lr", "nan"], "lr must be a finite number"),
        (["--ema-decay", "1"], "ema_decay must be ≥ 0 and < 1"),
        (["--checkpoint-every", "-1"], "checkpoint_every must be ≥ 0"),
        (["--grad-clip", "inf"], "grad_clip must be a finite number"),
        (["--arch", "conv"], "architecture must be one of relu, topk"),
        (["--architecture", ","], "no values"),
        (["--device", "evil"], "'evil' is not a device"),
        (["--device", "cuda:99"], "cuda:99"),
        (["--seed", "-1"], "seed must be ≥ 0"),
        (["--k", "4", "--k-start", "100000"], "k_start must be ≥ 4 and ≤ 32"),
        (["--d-sae", "1e12"], "d_sae must be ≥ 1 and ≤ 16,777,216"),
        (["--batch-size", "1000", "--tokens", "1e9"], "more than the 300 tokens"),
    ],
)
def test_bad_train_values(tmp_path, capsys, store, args, names):
    refused(
        ["train", "--acts", store, "--out", tmp_path / "run", "--tokens", "2k", "--d-sae", "32", *args],
        capsys,
        names,
        tmp_path,
    )
    assert not (tmp_path / "run").exists()


def test_an_sae_larger_than_memory_is_refused_before_allocating():
    from nanosae.train.trainer import check_fits

    with pytest.raises(nanosae.ConfigError, match="needs about 2,048 GiB"):
        check_fits(4096, 1 << 24, 4096, "cpu")  # within the d_sae cap, not within any laptop
    check_fits(576, 4608, 576, "cpu")


@pytest.mark.parametrize("acts,names", [(torch.zeros(300, 8), "all zero"), (torch.randn(300, 1), None)])
def test_degenerate_stores(tmp_path, capsys, acts, names):
    """An all-zero store is refused naming it; a width-1 store trains (AuxK takes at least one latent)."""
    path = write_store(tmp_path / "acts", acts).path
    args = [
        "train",
        "--acts",
        path,
        "--out",
        tmp_path / "run",
        "--tokens",
        "1k",
        "--batch-size",
        "100",
        "--d-sae",
        "4",
        "--k",
        "1",
    ]
    if names:
        refused(args, capsys, names, tmp_path)
        assert not (tmp_path / "run").exists()
    else:
        assert run_cli(args, capsys)[0] == 0


def test_out_that_is_a_file(tmp_path, capsys, store, tiny_llama_dir, word_corpus):
    (tmp_path / "file").write_text("mine")
    refused(
        ["train", "--acts", store, "--out", tmp_path / "file", "--tokens", "1k", "--d-sae", "32"],
        capsys,
        "is a file",
        tmp_path,
    )
    refused(
        [
            "collect",
            "--model",
            tiny_llama_dir,
            "--hook",
            "blocks.0.hook_resid_post",
            "--data",
            word_corpus,
            "--out",
            tmp_path / "file",
            "--tokens",
            "100",
        ],
        capsys,
        "is a file",
        tmp_path,
    )


def test_bad_values_of_model_commands(tmp_path, capsys, tiny_llama_dir):
    for args, names in [
        (["--temperature", "nan"], "temperature must be"),
        (["--temperature", "-1"], "temperature must be"),
        (["--top-k", "0"], "top_k must be"),
        (["--max-new-tokens", "-2"], "max_new_tokens must be"),
    ]:
        refused(["models", "generate", tiny_llama_dir, "w5 w6", *args], capsys, names, tmp_path)


def test_bad_data_files(tmp_path, capsys, tiny_llama_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    (tmp_path / "null.jsonl").write_text('{"text": null}\n')
    for data, names in [
        (tmp_path / "ints.parquet", "ints.parquet: column 'text' holds int64"),
        (tmp_path / "null.jsonl", "null.jsonl:1: field 'text' is null"),
    ]:
        refused(
            [
                "collect",
                "--model",
                tiny_llama_dir,
                "--hook",
                "blocks.0.hook_resid_post",
                "--data",
                data,
                "--out",
                tmp_path / "acts",
                "--tokens",
                "100",
                "--split",
                "all",
            ],
            capsys,
            names,
            tmp_path / "ints.parquet",
        )


def test_bad_nanochat_checkpoints(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({}, ckpt / "model_000001.pt")
    good = {"sequence_len": 32, "vocab_size": 64, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "n_embd": 16}
    cases = [
        ("nanochat:" + str(ckpt) + "@abc", None, "the step after @ must be a number"),
        ("nanochat:" + str(ckpt), {"model_config": good | {"n_layer": "two"}}, "n_layer must be a positive integer"),
        ("nanochat:" + str(ckpt), {"model_config": good | {"n_head": 0}}, "n_head must be a positive integer"),
        ("nanochat:" + str(ckpt), 7, "meta_000001.json: expected a JSON object"),
        ("nanochat:" + str(ckpt), {"model_config": [1]}, "no model_config object"),
    ]
    for spec, meta, names in cases:
        (ckpt / "meta_000001.json").write_text(json.dumps(meta))
        refused(["models", "hooks", spec], capsys, names, ckpt)
    (ckpt / "meta_000001.json").write_text(json.dumps({"model_config": good}))
    torch.save([1, 2], ckpt / "model_000001.pt")
    refused(["models", "hooks", "nanochat:" + str(ckpt)], capsys, "model_000001.pt: expected a state dict", ckpt)


def test_bad_values_of_viewer_and_features(viewer_run, tmp_path, capsys):
    refused(["view", viewer_run, "--port", "99999"], capsys, "--port must be 1..65535", viewer_run)
    refused(["features", viewer_run, "--top-n", "-3"], capsys, "top_n must be ≥ 1", viewer_run)
    refused(["features", viewer_run, "--batch-size", "0"], capsys, "batch_size must be ≥ 1", viewer_run)
    refused(["steer", "w5", "--sae", viewer_run, "--feature", "2=+1e999"], capsys, "finite number", viewer_run)
    (tmp_path / "features.db").write_bytes(b"\0garbage" * 64)
    refused(["view", tmp_path], capsys, "is not a features database", tmp_path)
    refused(["explain", tmp_path], capsys, "is not a features database", tmp_path)


def test_corrupt_features_checkpoint_starts_the_pass_over(tmp_path, tiny_model, word_corpus, caplog):
    from nanosae import DataConfig
    from nanosae.interp.features import FeaturesConfig, build_features

    sae = SAE(SAEConfig(d_in=32, d_sae=16, architecture="topk", k=3, hook_name="blocks.1.hook_resid_post"))
    cfg = FeaturesConfig(
        data=DataConfig(specs=[str(word_corpus)], context_size=16, split="all"), tokens=200, batch_size=4
    )
    (tmp_path / "features.db.partial.pt").write_bytes(b"PK\x03\x04 truncated")
    build_features(sae, tiny_model, cfg, tmp_path / "features.db")
    assert "unreadable" in caplog.text and (tmp_path / "features.db").exists()
    assert not (tmp_path / "features.db.partial.pt").exists()


def test_a_fifo_in_place_of_a_file_is_refused_not_waited_on(tmp_path, capsys):
    """Opening a FIFO for reading waits for a writer forever: every reader refuses one first."""
    import os

    sae_dir = tmp_path / "sae"
    SAE(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2)).save(sae_dir)
    for name in ("cfg.json", "sae_weights.safetensors"):
        target = sae_dir / name
        kept = target.read_bytes()
        target.unlink()
        os.mkfifo(target)
        with pytest.raises(NanosaeError, match="is a FIFO"):
            SAE.load(sae_dir)
        target.unlink()
        target.write_bytes(kept)
    os.mkfifo(tmp_path / "sae.pt")
    with pytest.raises(NanosaeError, match="is a FIFO"):
        SAE.load(tmp_path / "sae.pt")


def test_bad_values_of_circuit_commands(transcoder_set, tmp_path, capsys):
    refused(
        ["trace", "w5 w6", "--transcoders", transcoder_set, "--max-feature-nodes", "-1"],
        capsys,
        "--max-feature-nodes must be at least 1",
        transcoder_set,
    )
    refused(
        ["intervene", "w5 w6", "--transcoders", transcoder_set, "--set", "0_1_1=nan"],
        capsys,
        "must be a finite number",
        transcoder_set,
    )
    refused(
        ["features", transcoder_set / "layer_1", "--window-left", "1e9"], capsys, "window_left must be", transcoder_set
    )
    store = write_store(tmp_path / "acts", torch.randn(64, 8)).path
    refused(
        ["trace", "w5 w6", "--transcoders", transcoder_set, "--out", store / "graph.json"],
        capsys,
        "activation store",
        tmp_path,
    )


def test_a_checkpoint_whose_state_disagrees_with_its_name_is_skipped(tmp_path, store, caplog):
    from nanosae import TrainConfig

    cfg = dict(
        acts=str(store), out=str(tmp_path / "run"), d_sae=16, k=2, batch_size=50, tokens=50 * 6, checkpoint_every=2
    )
    whole = nanosae.train(TrainConfig.build(**cfg))
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step_6").rename(ckpts / "step_1000000000000000")  # a step far past the run, as a hostile name
    again = nanosae.train(TrainConfig.build(**cfg, resume=True))
    assert "step_1000000000000000 is unreadable" in caplog.text  # its state says step 6: not trusted
    for name, tensor in whole.sae.state_dict().items():
        assert torch.equal(tensor, again.sae.state_dict()[name]), name


@pytest.mark.parametrize(
    "content,names",
    [
        (b"", "no examples"),
        (b"\xff\xfe not utf-8", "not UTF-8"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"text": "w3", "labels": ' + b"9" * 5000 + b"}", "4300"),
        (b"[1, 2]\n", "expected a JSON object"),
        (b'{"text": 5, "labels": 1}\n', '"text" must be non-empty text'),
        (b'{"text": "  ", "labels": 1}\n', '"text" must be non-empty text'),
        (b'{"text": "w3 w4", "labels": 2}\n', '"labels" must be 0/1'),
        (b'{"text": "w3 w4", "labels": [1, [0]]}\n', '"labels" must be 0/1'),
        (b'{"text": "w3 w4", "labels": NaN}\n', '"labels" must be 0/1'),
        (b'{"text": "w3 w4", "labels": []}\n', '"labels" must be 0/1'),
        (b'{"text": "w3 w4"}\n', '"labels" must be 0/1'),
        (b'{"text": "w3 w4", "labels": 1}\n{oops\n', ":2 is not valid JSON"),
        (None, "is a directory"),
        ("fifo", "is a FIFO"),
    ],
)
def test_hostile_probing_tasks_are_refused_before_the_evaluation(viewer_run, tmp_path, capsys, content, names):
    import os

    task = tmp_path / "task.jsonl"
    if content is None:
        task.mkdir()
    elif content == "fifo":
        os.mkfifo(task)
    else:
        task.write_bytes(content)
    refused(
        ["eval", viewer_run, "--suite", "full", "--probing-task", task, "--tokens", "64"], capsys, names, viewer_run
    )


def test_a_probing_task_needs_the_full_suite(viewer_run, tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    task.write_text('{"text": "w3 w4", "labels": 1}\n')
    refused(["eval", viewer_run, "--probing-task", task], capsys, "add --suite full", viewer_run)


@SETTINGS
@given(
    key=st.sampled_from(["model", "cross_layer", "layers"]), value=JSON, layer_key=st.text(max_size=6), layer_value=JSON
)
@example(key="model", value=None, layer_key="¹", layer_value=None)  # a digit to isdigit(), not to int()
def test_random_transcoders_json_values_load_or_fail_in_one_line(transcoder_set, key, value, layer_key, layer_value):
    from nanosae.interp import circuits as C
    from nanosae.rundir import TranscoderSetDir

    path = TranscoderSetDir(transcoder_set).manifest
    original = path.read_text()
    try:
        for change in (lambda m: m | {key: value}, lambda m: m | {"layers": m["layers"] | {layer_key: layer_value}}):
            path.write_text(json.dumps(change(json.loads(original))))
            try:
                C.load_transcoders(transcoder_set)
            except NanosaeError as e:
                one_line_naming(e, transcoder_set)
    finally:
        path.write_text(original)


@SETTINGS
@given(
    key=st.sampled_from(["metadata", "qParams", "nodes", "links"]),
    value=JSON,
    node_key=st.sampled_from(["node_id", "feature_type", "layer", "ctx_idx"]),
    node_value=JSON,
)
def test_random_graph_file_values_show_or_fail_in_one_line(transcoder_set, key, value, node_key, node_value):
    """The viewer's graph routes and the static export answer a mutated graph file with the graph or its one-line
    reason: never a server traceback."""
    from fastapi.testclient import TestClient

    from nanosae.viewer import create_app

    path = transcoder_set / "graphs" / "tiny.json"
    original = path.read_text()
    client = TestClient(create_app(transcoder_set), base_url="http://localhost", raise_server_exceptions=True)
    try:
        good = json.loads(original)
        for data in (
            good | {key: value},
            good | {"nodes": [good["nodes"][0] | {node_key: node_value}, *good["nodes"][1:]]},
        ):
            path.write_text(json.dumps(data))
            for url in ("/api/graphs", "/api/graph/tiny"):
                r = client.get(url)
                assert r.status_code in (200, 404, 422, 500), r.status_code
                if r.status_code == 500:
                    assert "tiny.json" in r.json()["detail"] and "\n" not in r.json()["detail"]
    finally:
        path.write_text(original)


@SETTINGS
@given(key=st.sampled_from(["seed", "out", "source", "sae", "optim", "log_every", "sources"]), value=JSON)
def test_random_config_json_values_resume_or_fail_in_one_line(tmp_path_factory, key, value):
    """A run's config.json with one field replaced: --resume continues it or says why in one line."""
    from nanosae import TrainConfig

    root = tmp_path_factory.mktemp("cfg")
    store = write_store(root / "acts", torch.randn(400, 8))
    cfg = dict(
        acts=str(store.path), out=str(root / "run"), d_sae=16, k=2, batch_size=100, tokens=400, checkpoint_every=2
    )
    nanosae.train(TrainConfig.build(**cfg))
    config = root / "run" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {key: value}))
    try:
        nanosae.train(TrainConfig.build(**cfg, resume=True))
    except NanosaeError as e:
        one_line_naming(e, root / "run")
