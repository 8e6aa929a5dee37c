"""The engine's promises across the house: the explanation maths is one (the service,
``evaluate`` and ``report`` say the same numbers), and every transport goes through the
engine's steps (decode processes, batcher, spans) — the Open Inference Protocol included."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from helpers import FASHION_DATA, memory_exporter, run_images
from PIL import Image

from protonmf import explain
from protonmf.analysis import evaluate, report
from protonmf.artifact import load_manifest, load_tensors
from protonmf.service.engine.options import ExplainOptions
from protonmf.service.engine.pipeline import Engine
from protonmf.service.oip.rest import InputTensor, OipModel
from protonmf.service.ops.settings import Settings


def _png(path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).save(buf, "PNG")
    return buf.getvalue()


IMAGES = [_png(p) for p in sorted((FASHION_DATA / "test").glob("*/*.png"))[::40][:6]]


def _three_shares(artifact, tensors, manifest, engine):
    """(C, 2) energy/norm ratio as the service, evaluate and report compute them."""
    served = engine.listings.prototypes()["classes"]
    service = np.array(
        [[c["explained_share"]["energy"], c["explained_share"]["norm_ratio"]] for c in served],
        float,
    )
    ev = evaluate.explained_share(manifest, tensors)["per_class"]
    evaluated = np.array(
        [[ev[n]["energy"], ev[n]["norm_ratio"]] for n in manifest["classes"]], float
    )
    shares = report.class_shares(tensors, explain.folds(manifest))
    reported = np.stack([shares["energy"], shares["norm_ratio"]], 1)
    return service, evaluated, reported


def test_service_evaluate_and_report_agree_on_explained_share(fashion_artifact):
    manifest, tensors = load_manifest(fashion_artifact), load_tensors(fashion_artifact)
    engine = Engine.from_artifact(fashion_artifact)
    service, evaluated, reported = _three_shares(fashion_artifact, tensors, manifest, engine)
    np.testing.assert_allclose(service, evaluated, rtol=0, atol=1e-9)
    np.testing.assert_allclose(service, reported, rtol=0, atol=1e-9)
    assert np.all((service[:, 0] > 0) & (service[:, 0] <= 1))  # Fashion: every class explained


def test_the_three_agree_on_whole_vector_folds_and_zero_class_vectors(fashion_artifact):
    """Edge cases handled once: a whole-vector fold carries nothing of NMF's (0 in all
    three), a zero class vector has no share at all (null/NaN in all three)."""
    manifest, tensors = load_manifest(fashion_artifact), load_tensors(fashion_artifact)
    manifest["diagnostics"]["per_class"][2]["fold"] = "class_vector"
    for name in ("class_vectors", "prototypes", "nmf_prototypes", "residuals"):
        tensors[name] = tensors[name].copy()
        tensors[name][5] = 0.0
    engine = Engine.from_artifact(fashion_artifact)
    engine.listings.tensors, engine.listings.folds = tensors, explain.folds(manifest)
    service, evaluated, reported = _three_shares(fashion_artifact, tensors, manifest, engine)
    for got in (service, evaluated, reported):
        assert np.all(got[2] == 0.0), got[2]
        assert np.all(np.isnan(got[5])), got[5]
    ok = ~np.isnan(service)
    np.testing.assert_allclose(service[ok], evaluated[ok], atol=1e-9)
    np.testing.assert_allclose(service[ok], reported[ok], atol=1e-9)


def test_service_and_evaluate_agree_on_residual_shares_per_image(fashion_artifact):
    """/explain's residual_share of the top class = evaluate's, image by image."""
    manifest, tensors = load_manifest(fashion_artifact), load_tensors(fashion_artifact)
    engine = Engine.from_artifact(fashion_artifact)
    outs = run_images(engine, IMAGES)
    explained = [
        engine.explanations.explanation(o, ExplainOptions(top_k=1, heatmaps=False)) for o in outs
    ]
    logits = np.stack([o["logits"] for o in outs])
    pooled = np.stack([o["pooled"] for o in outs])
    logit_share, margin_share = evaluate.residual_shares_per_image(
        manifest, tensors, logits, pooled, logits.argmax(1)
    )
    for e, lg, mg in zip(explained, logit_share, margin_share, strict=True):
        share = e["top_k"][0]["residual_share"]
        assert share["logit"] == pytest.approx(lg, rel=1e-6, abs=1e-9)
        assert share["margin"] == pytest.approx(mg, rel=1e-6, abs=1e-9)
    assert engine.model.folds == explain.folds(manifest)


def test_oip_images_decode_in_the_decode_processes_with_the_engines_spans(
    fashion_artifact, exporter, monkeypatch
):
    """With PROTONMF_DECODE_PROCESSES on, an OIP request's images go to the decode
    processes (counted; the in-process decoder must not run) and its work shows as the
    engine's decode/infer/explain spans."""
    engine = Engine.from_artifact(fashion_artifact, Settings(decode_processes=1))

    def in_process(_):
        raise AssertionError("an OIP image was decoded in the worker, not in a decode process")

    monkeypatch.setattr(engine.model, "prepare", in_process)
    sent = []

    async def scenario():
        await engine.start()
        try:
            to_child = engine.decoder.prepare

            async def counted(blob):
                sent.append(len(blob))
                return await to_child(blob)

            monkeypatch.setattr(engine.decoder, "prepare", counted)
            oip = OipModel(engine)
            tensor = InputTensor("images", "BYTES", [len(IMAGES[:3])], IMAGES[:3])
            return await oip.infer([tensor], [("logits", {}), ("explanation", {})], {})
        finally:
            await engine.stop()

    logits, explanation = asyncio.run(scenario())
    assert sent == [len(b) for b in IMAGES[:3]]
    assert list(logits.shape) == [3, len(engine.model.classes)]
    assert len(explanation.data) == 3
    names = [s.name for s in exporter.get_finished_spans()]
    assert names.count("decode") == names.count("infer") == names.count("explain") == 1, names


@pytest.fixture
def exporter():
    return memory_exporter()
