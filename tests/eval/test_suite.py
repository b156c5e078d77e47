"""The full suite's bookkeeping: SAEBench-shaped records and the explanation score, from known inputs."""

import sqlite3

import pytest

from nanosae import SAE, SAEConfig
from nanosae.eval.suite import saebench_records
from nanosae.interp.featuredb import explanation_score


def test_saebench_records_carry_the_sections_under_saebenchs_names():
    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2, hook_name="blocks.0.hook_resid_post"))
    detail = {
        "first_letter": "a",
        "mean_absorption_fraction": 0.25,
        "full_absorption_rate": 0.1,
        "num_full_absorption": 1,
        "num_probe_true_positives": 10,
        "num_split_features": 0,
        "main_latents": [3],
        "k_sparse_f1": 0.5,
    }
    result = {
        "l0": 2.0,
        "l1": 3.0,
        "ce_loss_score": 0.9,
        "kl_div": 0.2,
        "dead_fraction": 0.25,
        "tokens": 100,
        "absorption": {
            "mean_absorption_fraction_score": 0.25,
            "mean_full_absorption_score": 0.1,
            "mean_num_split_features": 0.0,
            "std_dev_absorption_fraction_score": 0.0,
            "std_dev_full_absorption_score": 0.0,
            "std_dev_num_split_features": 0.0,
            "details": [detail],
            "config": {"max_k": 10},
        },
        "sparse_probing": {
            "llm_test_accuracy": 0.9,
            "sae_test_accuracy": 0.8,
            "sae_top_1_test_accuracy": 0.7,
            "details": {
                "keyword": {
                    "examples": 40,
                    "llm_test_accuracy": 0.9,
                    "sae_test_accuracy": 0.8,
                    "sae_top_1_test_accuracy": 0.7,
                }
            },
            "config": {"ks": [1]},
        },
        "explanations": {"latents_scored": 0, "note": "none"},
    }
    records = saebench_records(result, sae)
    assert set(records) == {"core", "absorption", "sparse_probing"}  # nothing scored: no autointerp record
    assert records["core"]["eval_result_metrics"]["misc"]["frac_alive"] == 0.75
    absorb = records["absorption"]
    assert absorb["eval_type_id"] == "absorption_first_letter"
    assert absorb["eval_result_metrics"]["mean"]["mean_absorption_fraction_score"] == 0.25
    assert absorb["eval_result_details"] == [
        {k: v for k, v in detail.items() if k not in ("main_latents", "k_sparse_f1")}
    ]
    probing = records["sparse_probing"]
    assert probing["eval_result_metrics"] == {
        "llm": {"llm_test_accuracy": 0.9},
        "sae": {"sae_test_accuracy": 0.8, "sae_top_1_test_accuracy": 0.7},
    }
    assert probing["eval_result_details"] == [
        {"dataset_name": "keyword", "llm_test_accuracy": 0.9, "sae_test_accuracy": 0.8, "sae_top_1_test_accuracy": 0.7}
    ]
    assert probing["sae_cfg_dict"]["d_sae"] == 16 and probing["eval_id"] != absorb["eval_id"]


def test_explanation_score_is_the_mean_over_scored_latents(viewer_run, tmp_path):
    import shutil

    db = tmp_path / "features.db"
    shutil.copy(viewer_run / "features.db", db)
    con = sqlite3.connect(db)
    con.execute("UPDATE latents SET score = 0.5, method = 'n2g' WHERE id = 4")
    con.commit()
    con.close()
    got = explanation_score(db)
    assert got["explanation_score"] == pytest.approx((0.9 + 0.5) / 2) and got["latents_scored"] == 2
    assert got["explanation_score_std"] == pytest.approx(0.2) and got["methods"] == ["n2g"]
    assert explanation_score(tmp_path / "missing.db")["latents_scored"] == 0
