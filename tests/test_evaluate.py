"""``protonmf evaluate``'s explanation measures, each against an independent reference:
torch's own model and LayerNorm, hand-made cases worked out on paper, numpy's trapezoid."""

import contextlib
import io
import json

import numpy as np
import pytest
from helpers import FASHION_DATA, FASHION_MODEL, run_cli

from protonmf.analysis.evaluate import (
    ablation_logits,
    auc,
    deletion_insertion,
    evaluate,
    evenly_spread,
    head_logits,
    intervention,
    residual_share,
)
from protonmf.artifact import Preprocessing, load_manifest, load_tensors, preprocess
from protonmf.data import load_image_folder
from protonmf.graph import GraphSession


@pytest.fixture(scope="module")
def report(fashion_artifact):
    """The CLI's JSON report on 100 held-out images (faithfulness on 16 of them)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code, _ = run_cli(
            "evaluate", fashion_artifact, "--json", "--max-images", 100, "--faith-images", 16
        )
    assert code == 0
    return json.loads(buf.getvalue())


@pytest.fixture(scope="module")
def fashion_torch(fashion_artifact):
    """24 held-out images: the black box's logits and pooled features from torch, and the
    graph's outputs on the same preprocessed batch."""
    torch = pytest.importorskip("torch")
    from protonmf.converter.models import recorded_model

    manifest = load_manifest(fashion_artifact)
    ex = GraphSession.load(fashion_artifact)
    samples = load_image_folder(FASHION_DATA / "test", ex.classes)[::21][:24]
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    x = np.stack([preprocess(s.open(), prep) for s in samples])
    model = recorded_model(manifest)
    with torch.no_grad():
        feats = model.forward_features(torch.from_numpy(x))  # (N, D, H, W)
        logits = model.forward_head(feats).double().numpy()
        pooled = feats.double().mean((2, 3)).numpy()
    labels = np.array([s.label for s in samples])
    return manifest, load_tensors(fashion_artifact, manifest), ex.run(x), logits, pooled, labels


# --- ablation heads (Table 3) ------------------------------------------------------------------


def test_ablation_heads_against_torch(fashion_torch):
    manifest, tensors, out, bb_logits, pooled, _ = fashion_torch
    assert manifest["head"]["kind"] == "avg_linear"
    heads = ablation_logits(manifest, tensors, out["pooled"])
    scale = np.abs(bb_logits).max()
    # the black-box head on the graph's pooled features is the torch model's logits
    np.testing.assert_allclose(heads["black_box"], bb_logits, atol=1e-5 * scale)
    assert (out["logits"].argmax(1) == bb_logits.argmax(1)).all()
    # NMF-only and residual-only from torch's pooled features and the converter's a, B, R
    a, B, R = (
        tensors[k].astype(np.float64) for k in ("coefficients", "nmf_prototypes", "residuals")
    )
    bias = tensors["bias"].astype(np.float64)
    assert {d["fold"] for d in manifest["diagnostics"]["per_class"]} <= {"sum", "min_norm"}
    np.testing.assert_allclose(
        heads["nmf_only"], pooled @ np.einsum("cp,cpd->cd", a, B).T + bias, atol=1e-5 * scale
    )
    np.testing.assert_allclose(heads["residual_only"], pooled @ R.T + bias, atol=1e-5 * scale)
    # the two parts add up to the graph's logits
    np.testing.assert_allclose(
        heads["nmf_only"] + heads["residual_only"] - bias, out["logits"], atol=1e-5 * scale
    )


def test_head_logits_layer_norm_against_torch():
    """LayerNorm head: V = W·γ and bias = b + W·β (the artifact's tensors) give torch's
    Linear(LayerNorm(f))."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    N, D, C, eps = 7, 12, 5, 1e-6
    f = torch.randn(N, D, generator=g, dtype=torch.float64) * 3 + 1
    norm = torch.nn.LayerNorm(D, eps=eps).double()
    fc = torch.nn.Linear(D, C).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(D, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(D, generator=g))
        want = fc(norm(f)).numpy()
        V = (fc.weight * norm.weight).numpy()
        bias = (fc.bias + fc.weight @ norm.bias).numpy()
    np.testing.assert_allclose(head_logits(V, f.numpy(), bias, eps), want, rtol=1e-10, atol=1e-10)
    # a plain head is f·Wᵀ + b
    np.testing.assert_allclose(head_logits(V, f.numpy(), bias), f.numpy() @ V.T + bias, rtol=1e-12)


def test_report_ablation(report, fashion_artifact):
    ab = report["ablation"]
    assert ab["augmented"] == ab["black_box"]  # exact: same predictions
    assert ab["augmented_agrees_with_black_box"] == 1.0
    assert ab["n_images"] == report["n_images"] == 100
    assert ab["augmented"] == report["top1_accuracy"]
    assert 0.5 < ab["nmf_only"] <= 1 and 0.5 < ab["residual_only"] <= 1


# --- explained share ---------------------------------------------------------------------------


def test_explained_share_matches_conversion_diagnostics(report, fashion_artifact):
    """energy = 1 − (‖R‖/‖V‖)², with ‖R‖/‖V‖ as the converter recorded it in float64."""
    per_class = load_manifest(fashion_artifact)["diagnostics"]["per_class"]
    got = report["explained_share"]["per_class"]
    for d in per_class:
        assert got[d["class"]]["energy"] == pytest.approx(1 - d["head_rel_error"] ** 2, abs=1e-5)
    tensors = load_tensors(fashion_artifact)
    aB = np.einsum("cp,cpd->cd", tensors["coefficients"], tensors["nmf_prototypes"])
    ratio = np.linalg.norm(aB, axis=1) / np.linalg.norm(tensors["class_vectors"], axis=1)
    np.testing.assert_allclose([got[d["class"]]["norm_ratio"] for d in per_class], ratio, rtol=1e-5)
    assert report["explained_share"]["mean_energy"] == pytest.approx(
        np.mean([1 - d["head_rel_error"] ** 2 for d in per_class]), abs=1e-5
    )


# --- residual share ----------------------------------------------------------------------------


def test_residual_share_against_torch(fashion_torch):
    """Plain head: the predicted class's residual share is R_c·f / V_c·f and the margin share
    (R_c − R_o)·f / (V_c − V_o)·f, f from torch."""
    manifest, tensors, out, bb_logits, pooled, _ = fashion_torch
    pred = out["logits"].argmax(1)
    got = residual_share(manifest, tensors, out["logits"], out["pooled"], pred)
    R, V = tensors["residuals"].astype(np.float64), tensors["class_vectors"].astype(np.float64)
    n = np.arange(len(pred))
    other = np.argsort(-bb_logits, 1)[:, 1]
    logit_share = (pooled @ R.T)[n, pred] / (pooled @ V.T)[n, pred]
    margin = ((pooled @ R.T)[n, pred] - (pooled @ R.T)[n, other]) / (
        bb_logits[n, pred] - bb_logits[n, other]
    )
    assert got["logit_median"] == pytest.approx(np.median(logit_share), rel=1e-4, abs=1e-6)
    assert got["logit_mean"] == pytest.approx(np.mean(logit_share), rel=1e-4, abs=1e-6)
    assert got["margin_median"] == pytest.approx(np.median(margin), rel=1e-4, abs=1e-6)
    assert got["margin_mean"] == pytest.approx(np.mean(margin), rel=1e-4, abs=1e-6)


# --- intervention (App. A.4) -------------------------------------------------------------------


def test_intervention_hand_made_case():
    logits = np.array(
        [
            [5.0, 4.0, 0.0],  # label 1 = runner-up: the oracle's −3 fixes it
            [1.0, 6.0, 5.5],  # label 2 = runner-up: −1.0 fixes it (both rules)
            [0.0, 2.0, 7.0],  # label 0 third: no switch-off can promote it
            [3.0, 1.0, 0.0],
        ]
    )  # correct; switching off 2.5 would break it
    labels = np.array([1, 2, 0, 0])
    pred = logits.argmax(1)
    contributions = np.array([[3.0, 0.5], [0.2, 1.0], [6.0, 1.0], [2.5, 0.5]])
    coefficients = np.array([[0.1, 0.9], [0.2, 0.3], [1.0, 0.0]])  # heaviest: 1, 1, 0
    got = intervention(logits, pred, contributions, coefficients, labels)
    assert got == {
        "errors": 3,
        "oracle_fixes": 2,
        "heaviest_fixes": 1,  # image 0: removing 0.5 leaves 4.5 > 4
        "true_runner_up_among_heaviest_fixes": 1,
        "top1": 0.25,
        "oracle_top1": 0.75,
        "heaviest_top1": 0.5,
        "blind_top1": 0.5,  # images 0, 1 fixed; image 3 broken
        "blind_heaviest_top1": 0.5,  # image 1 fixed, image 3 kept
        "top2_accuracy": 0.75,
    }


def test_report_intervention_bounds(report):
    iv = report["intervention"]
    assert iv["top1"] == report["top1_accuracy"]
    assert iv["errors"] == round((1 - iv["top1"]) * report["n_images"])
    # one lowered logit can only promote the runner-up: the oracle is bounded by top-2
    assert iv["true_runner_up_among_heaviest_fixes"] == iv["heaviest_fixes"]
    assert iv["top1"] <= iv["oracle_top1"] <= iv["top2_accuracy"]


# --- faithfulness ------------------------------------------------------------------------------


def _corner_model(images):
    """P(class 0) = mean brightness of the top-left quarter of a 4×4 image."""
    x = images.reshape(len(images), 4, 4, -1).mean(-1)
    p0 = x[:, :2, :2].mean((1, 2)) / 255.0
    return np.stack([p0, 1 - p0], 1)


@pytest.mark.parametrize("rgb", [False, True])
def test_deletion_insertion_known_saliency(rgb):
    """2×2 grid over a 4×4 white image, black baseline, a model that sees only the top-left
    cell: deleting it first drops P to 0 after one step of four."""
    shape = (1, 4, 4, 3) if rgb else (1, 4, 4)
    crops = np.full(shape, 255, np.uint8)
    baseline = np.zeros(shape[1:], np.float32)
    first = np.array([[[4.0, 3.0], [2.0, 1.0]]])  # top-left most salient
    last = -first
    fractions = np.linspace(0, 1, 5)
    d, i = deletion_insertion(crops, first, baseline, _corner_model, np.array([0]), steps=4)
    np.testing.assert_allclose(d, [[1, 0, 0, 0, 0]])
    np.testing.assert_allclose(i, [[0, 1, 1, 1, 1]])
    assert auc(fractions, d)[0] == pytest.approx(0.125)
    assert auc(fractions, i)[0] == pytest.approx(0.875)
    d, i = deletion_insertion(crops, last, baseline, _corner_model, np.array([0]), steps=4)
    assert auc(fractions, d)[0] == pytest.approx(0.875)
    assert auc(fractions, i)[0] == pytest.approx(0.125)
    # the end points given instead of run: the same curves
    d2, i2 = deletion_insertion(
        crops,
        last,
        baseline,
        _corner_model,
        np.array([0]),
        steps=4,
        p_original=np.array([1.0]),
        p_baseline=np.array([0.0]),
    )
    np.testing.assert_allclose(d2, d)
    np.testing.assert_allclose(i2, i)


def test_deletion_insertion_cells_cover_uneven_blocks():
    """5×5 pixels on a 2×2 grid: cell rows/cols are pixels 0–2 and 3–4. A model reading the
    brightness of pixel (2, 2) (in cell 0) and one reading (3, 3) (in cell 3)."""
    crops = np.full((2, 5, 5), 200, np.uint8)

    def probs(images):
        p = np.stack([images[:, 2, 2], images[:, 3, 3]], 1) / 200.0
        return np.concatenate([p, 1 - p], 1)

    saliency = np.array([[[1.0, 0], [0, 0]], [[0, 0], [0, 1.0]]])  # one cell each, first
    d, _ = deletion_insertion(crops, saliency, np.zeros((5, 5)), probs, np.array([0, 1]), steps=4)
    np.testing.assert_allclose(d, [[1, 0, 0, 0, 0], [1, 0, 0, 0, 0]])


def test_auc_is_the_trapezoid_rule():
    x = np.linspace(0, 1, 11)
    y = np.random.default_rng(0).random((3, 11))
    np.testing.assert_allclose(auc(x, y), np.trapezoid(y, x, axis=-1), rtol=1e-12)


def test_report_faithfulness_keys(report):
    f = report["faithfulness"]
    assert f["steps"] == 10 and f["n_images"] == 16
    assert set(f["baselines"]) == {"mean", "zero"}
    for base in f["baselines"].values():
        assert set(base) == {"prototype", "cam", "random"}
        for v in base.values():
            assert 0 <= v["deletion_auc"] <= 1 and 0 <= v["insertion_auc"] <= 1
            # the AUC is the trapezoid area under the mean curve (means commute with it)
            for kind in ("deletion", "insertion"):
                curve = v[f"{kind}_curve"]
                assert len(curve) == 11
                assert v[f"{kind}_auc"] == pytest.approx(np.trapezoid(curve, dx=0.1), abs=1e-4)
        # both curves end at the same two points: the image itself and the baseline
        assert base["cam"]["deletion_curve"][0] == base["random"]["insertion_curve"][-1]
        assert base["cam"]["deletion_curve"][-1] == base["prototype"]["insertion_curve"][0]


# --- both graph kinds, missing outputs, the CLI ------------------------------------------------


def test_topk_graph_gives_the_same_report(fashion_artifact, fashion_topk_artifact):
    kw = dict(max_images=40, faith_images=6, progress=False)
    a, b = evaluate(fashion_artifact, **kw), evaluate(fashion_topk_artifact, **kw)
    assert a["ablation"] == b["ablation"] and a["intervention"] == b["intervention"]
    for key in ("residual_share", "faithfulness"):
        _assert_close(a[key], b[key], 1e-5)


def _assert_close(x, y, tol):
    if isinstance(x, dict):
        assert x.keys() == y.keys()
        for k in x:
            _assert_close(x[k], y[k], tol)
    else:
        assert x == pytest.approx(y, rel=tol, abs=tol)


def test_no_pooled_no_maps_are_reported_unavailable(fashion_artifact, monkeypatch):
    """An old all-class graph (no ``pooled``) with --maps none: those keys say why."""
    run = GraphSession.run

    def old_graph(self, batch):
        out = run(self, batch)
        return {k: v for k, v in out.items() if k not in ("pooled", "maps")}

    monkeypatch.setattr(GraphSession, "run", old_graph)
    r = evaluate(fashion_artifact, max_images=20, progress=False)
    for key in ("ablation", "residual_share", "faithfulness"):
        assert set(r[key]) == {"unavailable"}, key
    assert "pooled" in r["ablation"]["unavailable"] and "maps" in r["faithfulness"]["unavailable"]
    assert r["intervention"]["errors"] >= 0 and "per_class" in r["explained_share"]


def test_evenly_spread_covers_every_class():
    classes = json.loads((FASHION_MODEL / "config.json").read_text())["label_names"]
    samples = load_image_folder(FASHION_DATA / "test", classes)
    idx = evenly_spread(len(samples), 30)
    assert len(idx) == 30 and len({samples[i].label for i in idx}) == 10
    assert (evenly_spread(7, None) == np.arange(7)).all() and len(evenly_spread(7, 100)) == 7


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sweep-p", "0,3"], "--sweep-p"),
        (["--sweep-p", "a"], "--sweep-p"),
        (["--faith-steps", "1"], "--faith-steps"),
    ],
)
def test_cli_refuses_bad_flags(fashion_artifact, args, message, capsys):
    code, _ = run_cli("evaluate", fashion_artifact, "--json", "--max-images", 5, *args)
    assert code == 2 and message in capsys.readouterr().err


def test_cli_no_faithfulness_and_text_output(fashion_artifact, capsys):
    code, out = run_cli(
        "evaluate", fashion_artifact, "--max-images", 20, "--no-faithfulness", capsys=capsys
    )
    assert code == 0
    assert "ablation" in out and "oracle_top1" in out and "skipped" in out
    code, out = run_cli(
        "evaluate",
        fashion_artifact,
        "--max-images",
        10,
        "--faith-images",
        2,
        "--faith-steps",
        4,
        capsys=capsys,
    )
    assert code == 0 and "deletion_auc" in out
    assert len(next(ln for ln in out.splitlines() if "deletion_curve" in ln).split()) == 1 + 5


# --- the p sweep (Fig. 5) ----------------------------------------------------------------------


@pytest.mark.e2e  # refits the NMF at two p
def test_sweep_head_error_falls_with_p(fashion_artifact):
    from protonmf.converter.sweep import sweep

    rows = sweep(fashion_artifact, [1, 3], max_images=30, max_per_class=20, progress=False)
    assert [r["p"] for r in rows] == [1, 3]
    assert rows[1]["head_rel_error"] < rows[0]["head_rel_error"] < 1
    assert rows[1]["feature_rel_error"] < rows[0]["feature_rel_error"] < 1
    # the augmented head is V whatever p: the black box's top-1 on the same 30 images
    ex = GraphSession.load(fashion_artifact)
    samples = load_image_folder(FASHION_DATA / "test", ex.classes)
    samples = [samples[i] for i in evenly_spread(len(samples), 30)]
    logits = ex.run(ex.preprocess([s.open() for s in samples]))["logits"]
    top1 = float((logits.argmax(1) == np.array([s.label for s in samples])).mean())
    assert rows[0]["augmented_top1"] == rows[1]["augmented_top1"] == top1


@pytest.mark.e2e
def test_sweep_at_the_artifacts_p_reproduces_its_conversion(fashion_artifact, capsys):
    """Same images, same NMF settings and seed: the artifact's own head error per class."""
    m = load_manifest(fashion_artifact)
    code, out = run_cli(
        "evaluate",
        fashion_artifact,
        "--json",
        "--max-images",
        10,
        "--no-faithfulness",
        "--sweep-p",
        m["p"],
        capsys=capsys,
    )
    (row,) = json.loads(out)["sweep"]
    per_class = m["diagnostics"]["per_class"]
    assert row["head_rel_error"] == pytest.approx(
        np.mean([d["head_rel_error"] for d in per_class]), rel=1e-5
    )
    assert row["feature_rel_error"] == pytest.approx(
        np.mean([d["feature_rel_error"] for d in per_class]), rel=1e-5
    )
