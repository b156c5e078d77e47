"""The write guard (nanosae.outputs): every command that writes refuses a path that holds something else, or
that lies inside another job's directory, before any work, and leaves the tree byte-identical; replacing an
earlier output of the same kind removes only what that output wrote."""

import json
import shutil

import pytest
import torch

from nanosae import SAE
from nanosae.data import write_store
from nanosae.outputs import MARKER
from tests.test_hostile_inputs import refused, run_cli, tree


@pytest.fixture()
def other_run(viewer_run, tmp_path):
    """A second training run: config.json, sae/, metrics.jsonl."""
    run = tmp_path / "other_run"
    shutil.copytree(viewer_run / "sae", run / "sae")
    (run / "config.json").write_text(json.dumps({"note": "another job"}))
    (run / "metrics.jsonl").write_text("")
    return run


@pytest.fixture()
def run_copy(viewer_run, tmp_path):
    """The viewer run, copied (so that exports into it can be tried without touching the shared fixture)."""
    run = tmp_path / "run"
    shutil.copytree(viewer_run, run)
    (run / "config.json").write_text(json.dumps({"note": "this job"}))
    return run


def test_exports_never_write_into_another_job(run_copy, other_run, tmp_path, capsys):
    refused(["export", "saelens", run_copy, "--out", other_run / "sae"], capsys, str(other_run), tmp_path)
    refused(["export", "neuronpedia", run_copy, "--out", other_run / "np"], capsys, str(other_run), tmp_path)
    store = write_store(tmp_path / "store", torch.randn(64, 32))
    refused(["export", "saelens", run_copy, "--out", store.path / "sae"], capsys, "activation store", tmp_path)


def test_an_export_replaces_only_an_earlier_export_of_its_kind(run_copy, tmp_path, capsys):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    (mine / "explanations.json").write_text("[]")
    refused(["export", "neuronpedia", run_copy, "--out", mine], capsys, "did not write", tmp_path)
    out = tmp_path / "np"
    assert run_cli(["export", "neuronpedia", run_copy, "--out", out], capsys)[0] == 0
    first = tree(out)
    assert "batch-0.json" in first and "sae/cfg.json" in first and MARKER in first
    (out / "batch-9.json").write_text("{}")  # as an earlier export with more features left it
    (out / MARKER).write_text((out / MARKER).read_text() + "batch-9.json\n")
    assert run_cli(["export", "neuronpedia", run_copy, "--out", out], capsys)[0] == 0
    assert tree(out) == first  # the stale batch of the earlier export is gone, nothing else changed
    refused(["export", "saelens", run_copy, "--out", out], capsys, "Neuronpedia export", tmp_path)  # another kind
    (out / "mine.txt").write_text("added by a person")
    refused(["export", "neuronpedia", run_copy, "--out", out], capsys, "mine.txt", tmp_path)
    (out / "mine.txt").unlink()
    (out / "empty").mkdir()  # an empty directory or a link a person made is theirs too
    refused(["export", "neuronpedia", run_copy, "--out", out], capsys, "empty", tmp_path)
    (out / "empty").rmdir()
    (out / "link").symlink_to(tmp_path)
    refused(["export", "neuronpedia", run_copy, "--out", out], capsys, "link", tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or lock files left


def test_saelens_export_into_the_runs_own_sae_dir_is_refused(run_copy, capsys, tmp_path):
    refused(["export", "saelens", run_copy, "--out", run_copy / "sae"], capsys, "did not write", tmp_path)
    out = run_copy / "saelens"  # inside its own run: allowed
    assert run_cli(["export", "saelens", run_copy, "--out", out], capsys)[0] == 0
    assert SAE.load(out).cfg.d_sae == 24


def test_features_and_eval_never_replace_a_file_they_did_not_write(run_copy, other_run, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database")
    refused(["features", run_copy, "--out", notes, "--tokens", "64"], capsys, "not a features database", tmp_path)
    refused(
        ["features", run_copy, "--out", other_run / "features.db", "--tokens", "64"], capsys, str(other_run), tmp_path
    )
    page = tmp_path / "reports" / "report.html"
    page.parent.mkdir()
    page.write_text("<html>my own report</html>")
    refused(["eval", run_copy, "--out", page.parent, "--tokens", "64"], capsys, "not a evaluation report", tmp_path)
    refused(["eval", run_copy, "--out", other_run, "--tokens", "64"], capsys, str(other_run), tmp_path)


def test_train_never_writes_a_run_into_a_store(tmp_path, capsys):
    store = write_store(tmp_path / "store", torch.randn(512, 8))
    refused(
        ["train", "--acts", store.path, "--out", store.path, "--d-sae", "16", "--k", "2", "--tokens", "512"],
        capsys,
        "activation store",
        tmp_path,
    )
    refused(
        ["train", "--acts", store.path, "--out", store.path / "run", "--d-sae", "16", "--k", "2", "--tokens", "512"],
        capsys,
        "activation store",
        tmp_path,
    )


def test_collect_never_writes_a_store_over_other_files(tiny_llama_dir, word_corpus, tmp_path, capsys):
    out = tmp_path / "acts"
    (out / "blocks.1.hook_resid_post").mkdir(parents=True)
    (out / "blocks.1.hook_resid_post" / "thesis.txt").write_text("years of work")
    refused(
        [
            "collect",
            "--model",
            tiny_llama_dir,
            "--hook",
            "blocks.1.hook_resid_post",
            "--data",
            word_corpus,
            "--tokens",
            "256",
            "--out",
            out,
        ],
        capsys,
        "not a store",
        tmp_path,
    )


def test_view_export_through_a_symlink_replaces_the_target_and_keeps_the_link(viewer_run, tmp_path):
    from nanosae.viewer import export_static

    real = tmp_path / "real"
    link = tmp_path / "site"
    export_static(viewer_run, real)
    link.symlink_to(real)
    export_static(viewer_run, link)
    assert link.is_symlink() and (link / "index.html").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real", "site"]  # no .old or temp left behind


def test_an_export_written_by_an_earlier_version_is_still_replaced(viewer_run, tmp_path):
    from nanosae.viewer import export_static

    site = tmp_path / "site"
    export_static(viewer_run, site)
    files = sorted(str(p.relative_to(site)) for p in site.rglob("*") if p.is_file() and p.name != MARKER)
    (site / MARKER).unlink()
    (site / ".nanosae-site").write_text("".join(f + "\n" for f in files))  # the old marker: a file list alone
    export_static(viewer_run, site)
    assert (site / MARKER).read_text().splitlines()[0] == "viewer site"


def test_every_file_of_an_export_follows_the_umask(viewer_run, tmp_path):
    import os

    from nanosae.viewer import export_static

    old = os.umask(0o027)
    try:
        export_static(viewer_run, tmp_path / "site")
    finally:
        os.umask(old)
    for p in [tmp_path / "site", *(tmp_path / "site").rglob("*")]:
        assert p.stat().st_mode & 0o777 == (0o750 if p.is_dir() else 0o640), p
