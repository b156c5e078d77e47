"""The synthetic ground truth: the generator does what its settings say, and the scores say what they should
on dictionaries whose answer is known."""

import math

import pytest
import torch

import nanosae
from nanosae import SAE, SAEConfig
from nanosae.errors import ConfigError
from nanosae.eval.synthetic import (
    DENSE_PROBABILITY,
    PRESETS,
    SyntheticConfig,
    SyntheticModel,
    rebatch,
    synthetic_scores,
    true_dictionary_sae,
)

N_SAMPLES = 40_000


def within(observed: float, p: float, n: int, sds: float = 4.0) -> bool:
    """A binomial proportion within `sds` standard deviations of p (never tighter than one count)."""
    return abs(observed - p) <= sds * math.sqrt(p * (1 - p) / n) + 1 / n


def test_firing_follows_the_settings():
    cfg = SyntheticConfig(
        n_features=200,
        d=32,
        mean_l0=6.0,
        parents=5,
        children=3,
        child_prob=0.4,
        correlated_pairs=5,
        correlation=0.6,
        seed=1,
    )
    model = SyntheticModel(cfg)
    _, mags = model.sample(N_SAMPLES, torch.Generator().manual_seed(2))
    fired = mags > 0
    l0 = fired.sum(1).float()
    # the mean L0 is the setting, within its sampling error (the correlated pairs add a little on top)
    assert abs(float(l0.mean()) - cfg.mean_l0) < 4 * float(l0.std()) / math.sqrt(N_SAMPLES) + 0.1
    independent = (model.parent_of < 0) & (model.pair_of < 0)
    rates = fired.float().mean(0)
    assert all(within(float(rates[i]), float(model.probs[i]), N_SAMPLES) for i in independent.nonzero().squeeze(1))
    # independent of each other and of the sample's place, whether drawn densely or sparsely (DENSE_PROBABILITY)
    alone = independent.nonzero().squeeze(1)
    by_rate = alone[model.probs[alone].argsort(descending=True)]
    common, rare = by_rate[0], by_rate[len(by_rate) // 3]
    assert model.probs[common] > DENSE_PROBABILITY >= model.probs[rare]
    for i, j in ((common, rare), (rare, by_rate[len(by_rate) // 3 + 1]), (common, by_rate[1])):
        both = float((fired[:, i] & fired[:, j]).float().mean())
        assert within(both, float(model.probs[i] * model.probs[j]), N_SAMPLES)
    halves = fired[: N_SAMPLES // 2, rare].float().mean(), fired[N_SAMPLES // 2 :, rare].float().mean()
    assert all(within(float(h), float(model.probs[rare]), N_SAMPLES // 2) for h in halves)
    # Zipfian: sorted probabilities fall as rank^-zipf wherever none is clipped at 1
    p = model.probs[independent].sort(descending=True).values.double()
    unclipped = p < 1
    ranks = torch.arange(1, len(p) + 1).double()[unclipped]
    slope = torch.linalg.lstsq(
        torch.stack([ranks.log(), torch.ones_like(ranks)], 1), p[unclipped].log()[:, None]
    ).solution
    assert float(slope[0]) == pytest.approx(-cfg.zipf, abs=0.15)
    for child in (model.parent_of >= 0).nonzero().squeeze(1):
        parent = model.parent_of[child]
        assert not (fired[:, child] & ~fired[:, parent]).any()  # never without its parent
        with_parent = fired[fired[:, parent], child].float()
        assert within(float(with_parent.mean()), cfg.child_prob, len(with_parent))
    for second in (model.pair_of >= 0).nonzero().squeeze(1):
        first = model.pair_of[second]
        on, off = fired[fired[:, first], second].float(), fired[~fired[:, first], second].float()
        own = float(model.probs[second])
        assert within(float(on.mean()), own + (1 - own) * cfg.correlation, len(on))  # pulled in, or on its own
        assert within(float(off.mean()), own, len(off))
    with pytest.raises(ConfigError, match="need more than n_features"):
        SyntheticConfig(n_features=10, mean_l0=2.0, parents=3, children=4)


def test_the_true_dictionary_scores_1_and_a_random_one_its_expected_value():
    model = SyntheticModel(PRESETS["tiny"])
    truth = synthetic_scores(true_dictionary_sae(model), model, samples=5000)
    assert truth["mcc"] == pytest.approx(1.0, abs=1e-5) and truth["uniqueness"] == 1.0
    torch.manual_seed(0)
    random_sae = SAE(SAEConfig(d_in=64, d_sae=256, architecture="topk", k=8))
    got = synthetic_scores(random_sae, model, samples=5000)["mcc"]
    # bounds computed here, without the Hungarian matching: a greedy one-to-one matching from below, and each
    # true feature's best latent, shared or not, from above
    d = random_sae.W_dec.detach() / random_sae.W_dec.detach().norm(dim=1, keepdim=True)
    cos = model.features @ d.T
    upper = float(cos.max(1).values.mean())
    taken, greedy = set(), []
    for value, flat in zip(*cos.flatten().sort(descending=True)):
        i, j = divmod(int(flat), cos.shape[1])
        if i not in {a for a, _ in taken} and j not in {b for _, b in taken}:
            taken.add((i, j))
            greedy.append(float(value))
        if len(taken) == cos.shape[0]:
            break
    assert sum(greedy) / len(greedy) - 1e-4 <= got <= upper + 1e-4 and got < 0.5


def test_an_sae_at_the_true_features_finds_them_and_planted_absorption_is_found():
    """Orthogonal features (no superposition): the true dictionary's latents fire where their features do; a
    parent latent made silent whenever a child fires has absorbed its children."""
    cfg = SyntheticConfig(n_features=48, d=64, mean_l0=5.0, parents=4, children=3, child_prob=0.5, seed=4)
    model = SyntheticModel(cfg)
    sae = true_dictionary_sae(model)
    clean = synthetic_scores(sae, model, samples=20_000)
    assert clean["f1"] > 0.97 and clean["absorption"] < 0.05
    with torch.no_grad():  # every parent's latent now reads its children's directions strongly negative
        for parent in range(cfg.parents):
            kids = (model.parent_of == parent).nonzero().squeeze(1)
            sae.W_enc[:, parent] -= 10 * model.features[kids].sum(0)
    absorbed = synthetic_scores(sae, model, samples=20_000)
    assert absorbed["absorption"] > 0.95


def test_nanosae_trains_on_the_synthetic_stream(tmp_path):
    model = SyntheticModel(PRESETS["tiny"])
    cfg = nanosae.TrainConfig.build(out=str(tmp_path / "run"), d_sae=256, k=8, tokens=200_000, batch_size=1024)
    result = nanosae.train(cfg, source=model)
    scores = synthetic_scores(result.sae, model, samples=10_000)
    assert scores["mcc"] > 0.6 and scores["variance_explained"] > 0.7 and scores["l0"] == pytest.approx(8, abs=0.1)


def test_the_stream_is_the_same_samples_whatever_the_batch_size():
    """Trainers with other batch sizes (nanosae's formula, SAELens's 1024) are handed exactly the same samples."""
    model = SyntheticModel(PRESETS["tiny"])
    n = 2500  # more than two chunks

    def first(batch_size, seed=3):
        out, stream = [], model.batches(batch_size, seed=seed)
        while sum(len(b) for b in out) < n:
            out.append(next(stream))
        return torch.cat(out)[:n]

    a = first(37)
    assert torch.equal(a, first(1024)) and torch.equal(a, first(n))
    assert not torch.allclose(a, first(37, seed=4))


def test_rebatch_cuts_chunks_of_any_size_in_order():
    """A peer's world (benchmarks/synthsaebench.py) hands rebatch chunks of its own size: batches are the chunks'
    rows in order, none dropped or repeated."""
    rows = torch.arange(200.0).unsqueeze(1)
    chunks = iter(torch.split(rows, [5, 7, 1, 30, 2] * 4 + [20]))
    batches = [b for b, _ in zip(rebatch(chunks, 9), range(20))]
    assert all(len(b) == 9 for b in batches) and torch.equal(torch.cat(batches), rows[:180])


def test_eval_synthetic_from_the_command_line(tmp_path):
    """Without SAEs it trains the four on one stream and scores them; given SAEs it scores those (the true
    dictionary at MCC 1), keeping eval.json's other sections; a wrong width is one line naming the SAE."""
    import json

    from typer.testing import CliRunner

    from nanosae.cli import app

    runner = CliRunner()
    out = tmp_path / "synth"
    done = runner.invoke(app, ["eval", "--synthetic", "tiny", "--samples", "20k", "--out", str(out)])
    assert done.exit_code == 0, done.output
    section = json.loads((out / "eval.json").read_text())["synthetic"]
    assert set(section["results"]) == {"topk", "batchtopk", "matryoshka", "jumprelu"}
    assert section["trained_samples"] == 20_000 and section["config"]["n_features"] == 256
    topk = section["results"]["topk"]
    assert topk["l0"] == pytest.approx(8, abs=0.1) and len(topk["recovered_by_frequency"]) == 10
    assert "recovered" in (out / "report.html").read_text()

    true = true_dictionary_sae(SyntheticModel(PRESETS["tiny"]))
    true.save(tmp_path / "true")
    scored = tmp_path / "scored"
    scored.mkdir()
    (scored / "eval.json").write_text(json.dumps({"fvu": 0.5}))
    done = runner.invoke(app, ["eval", str(tmp_path / "true"), "--synthetic", "tiny", "--out", str(scored)])
    assert done.exit_code == 0, done.output
    data = json.loads((scored / "eval.json").read_text())
    assert data["fvu"] == 0.5 and data["synthetic"]["results"]["true"]["mcc"] == pytest.approx(1.0)
    assert data["synthetic"]["trained_samples"] is None
    done = runner.invoke(app, ["eval", str(tmp_path / "true"), "--synthetic", "cpu", "--out", str(scored)])
    assert done.exit_code != 0 and "true: d_in is 64, the cpu preset's activations have d=256" in str(done.exception)
