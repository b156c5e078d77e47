import json
import sqlite3

import pytest
import torch

from nanosae import SAE, SAEConfig, DataConfig
from nanosae.interp.features import FeaturesConfig, build_features

XSS_TOKENS = ["<script>window.__xss = 1</script>", '<img src=x onerror="window.__xss = 2">']


@pytest.fixture(scope="session")
def viewer_run(tiny_model, tiny_llama_dir, word_corpus, tmp_path_factory):
    """A run directory: sae/, features.db (with hostile text planted in it), eval.json."""
    run = tmp_path_factory.mktemp("viewer_run")
    torch.manual_seed(2)
    sae = SAE(SAEConfig(d_in=32, d_sae=24, architecture="topk", k=3, hook_name="blocks.1.hook_resid_post",
                        model_name=str(tiny_llama_dir)))
    sae.save(run / "sae")
    cfg = FeaturesConfig(data=DataConfig(specs=[str(word_corpus)], context_size=16, split="all"), tokens=500, top_n=4,
                         batch_size=4)
    build_features(sae, tiny_model, cfg, run / "features.db")
    con = sqlite3.connect(run / "features.db")
    row = con.execute("SELECT rowid, tokens FROM examples WHERE latent = 3 AND kind = 'top' ORDER BY rank").fetchone()
    tokens = json.loads(row[1])
    tokens[0], tokens[1] = XSS_TOKENS
    con.execute("UPDATE examples SET tokens = ? WHERE rowid = ?", (json.dumps(tokens), row[0]))
    con.execute("UPDATE latents SET explanation = ?, score = 0.9 WHERE id = 3", ('<b onmouseover="window.__xss=3">bold</b> words',))
    con.commit()
    con.close()
    (run / "eval.json").write_text(json.dumps({"fvu": 0.1, "l0": 3.0, "ce_loss_score": 0.95, "feature_density": [0.1]}))
    return run
