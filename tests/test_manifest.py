"""The typed manifest: every load validates it; a mistyped or inconsistent one is refused
with the field and the reason, in one line; what this version does not know is kept."""

import json
import shutil

import pytest

from protonmf.artifact import ArtifactError, load_manifest
from protonmf.artifact.manifest import Manifest


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda m: m.update(p="three"), "p: Input should be a valid integer"),
        (lambda m: m.update(classes=[]), "classes: List should have at least 1 item"),
        (lambda m: m["graph"].update(k=0), "graph.k: Input should be greater than or equal to 1"),
        (lambda m: m.update(class_descriptions=["one"]), "class_descriptions has 1 entries"),
        (
            lambda m: m["diagnostics"]["per_class"][0].update(n_images=-1),
            "diagnostics.per_class.0.n_images",
        ),
    ],
)
def test_a_mistyped_manifest_is_refused_with_its_field(fashion_artifact, tmp_path, edit, reason):
    art = tmp_path / "art"
    shutil.copytree(fashion_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    edit(manifest)
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError) as e:
        load_manifest(art)
    assert reason in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_typed_view_of_a_real_manifest(fashion_artifact):
    raw = load_manifest(fashion_artifact)
    m = Manifest.of(raw)
    assert m.classes == raw["classes"] and m.p == raw["p"]
    assert m.folds == [d["fold"] for d in raw["diagnostics"]["per_class"]]
    assert m.graph.maps == raw["graph"]["maps"] and m.preprocessing.height == 56
    assert m.layer_norm_eps is None  # Fashion's head is plain linear
    assert m.feature_dim == raw["feature_dim"] and m.diagnostics.onnx_exactness.n_images > 0
    first = raw["diagnostics"]["per_class"][0]
    assert m.diagnostics.per_class[0].model_extra["nmf_iterations"] == first["nmf_iterations"]
    assert Manifest.of({**raw, "added_later": 1}).model_extra["added_later"] == 1  # kept
    assert Manifest.of(m) is m
