"""The fused ONNX explainer graph: parity with the original model, structure, outputs."""

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from helpers import FASHION_DATA, manifest_of, run_cli
from onnx import numpy_helper

from protonmf.analysis.evaluate import explanation_residual
from protonmf.artifact import FORMAT_VERSION, ArtifactError
from protonmf.data import load_image_folder
from protonmf.graph import GraphSession, ProviderError, create_session


def verify_json(artifact, capsys, *extra):
    code, out = run_cli("verify", artifact, "--json", *extra, capsys=capsys)
    return code, json.loads(out)


def test_verify_fashion_default_data(fashion_artifact, capsys):
    code, r = verify_json(fashion_artifact, capsys)  # --data defaults to the held-out split
    assert code == 0
    assert r["n_images"] == 500 and r["data"].endswith("fashion-mnist/test")
    assert r["top1_agreement"] == 1.0
    assert r["max_rel_logit_diff"] <= 1e-5
    assert r["provider"] == "CPUExecutionProvider"


def test_verify_lite0_on_photos(lite0_artifact, imagenet_photos, capsys):
    code, r = verify_json(lite0_artifact, capsys, "--data", imagenet_photos)
    assert code == 0
    assert r["n_images"] == 20 and r["top1_agreement"] == 1.0
    assert r["max_rel_logit_diff"] <= 1e-5


def test_evaluate_fashion(fashion_artifact, capsys):
    code, out = run_cli("evaluate", fashion_artifact, "--json", capsys=capsys)
    r = json.loads(out)
    assert code == 0 and r["n_images"] == 500
    assert r["top1_accuracy"] >= 0.88  # the model's 91% on the full test set
    assert r["max_explanation_residual"] <= 1e-5


@pytest.fixture(scope="module")
def fashion_batch(fashion_topk_artifact):
    """The top-k graph (the default of a 1,000-class model) on 32 held-out images."""
    ex = GraphSession.load(fashion_topk_artifact)
    samples = load_image_folder(FASHION_DATA / "test", ex.classes)[::5][:32]
    return ex, ex.preprocess([s.open() for s in samples])


def test_contributions_add_up_to_logits(fashion_batch):
    ex, x = fashion_batch
    out = ex.run(x)
    top = out["topk_classes"]  # scores="topk": the k predicted classes
    logits = np.take_along_axis(out["logits"], top, 1)
    total = out["topk_contributions"].sum(-1) + out["topk_bias"]
    scale = np.abs(out["logits"]).max(1, keepdims=True)
    assert (np.abs(total - logits) / scale).max() <= 1e-5
    np.testing.assert_allclose(
        out["topk_contributions"],
        out["topk_scores"] * ex.tensors["coefficients"][top],
        rtol=1e-5,
        atol=1e-6,
    )
    assert explanation_residual(out).max() <= 1e-5


@pytest.mark.parametrize("n", [1, 3, 32])
def test_dynamic_batch(fashion_batch, n):
    ex, x = fashion_batch
    out = ex.run(x[:n])
    m = ex.manifest
    C, p, D = len(m["classes"]), m["p"], m["feature_dim"]
    (H, W), k = m["feature_grid"], m["graph"]["k"]
    assert out["logits"].shape == (n, C)
    assert out["topk_scores"].shape == out["topk_contributions"].shape == (n, k, p)
    assert out["topk_classes"].shape == out["topk_bias"].shape == (n, k)
    assert out["pooled"].shape == (n, D)
    assert out["topk_maps"].shape == (n, k, p, H, W)
    # per-image results do not depend on the batch they came in
    np.testing.assert_allclose(out["logits"], ex.run(x)["logits"][:n], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def all_outputs(fashion_artifact, fashion_batch):
    """The Fashion default, the same prototypes with scores="all", maps="all": every class."""
    _, x = fashion_batch
    ex = GraphSession.load(fashion_artifact)
    # format 3: a constant bias is not a graph output; GraphSession.run adds the tensor.
    # format 4: pooled features in every graph (the residual split needs them)
    assert list(ex.manifest["graph"]["outputs"]) == [
        "logits",
        "scores",
        "contributions",
        "pooled",
        "maps",
    ]
    out = ex.run(x)
    np.testing.assert_array_equal(out["bias"][0], ex.tensors["bias"])
    return out


@pytest.mark.parametrize("n", [1, 3, 32])
def test_dynamic_batch_all_classes(fashion_artifact, fashion_batch, all_outputs, n):
    _, x = fashion_batch
    ex = GraphSession.load(fashion_artifact)
    out = ex.run(x[:n])
    m = ex.manifest
    C, p, (H, W) = len(m["classes"]), m["p"], m["feature_grid"]
    assert out["logits"].shape == out["bias"].shape == (n, C)
    assert out["scores"].shape == out["contributions"].shape == (n, C, p)
    assert out["maps"].shape == (n, C, p, H, W)
    for name in ("logits", "contributions", "maps"):
        np.testing.assert_allclose(out[name], all_outputs[name][:n], rtol=1e-5, atol=1e-5)


def test_topk_outputs_are_slices_of_all_outputs(fashion_batch, all_outputs):
    ex, x = fashion_batch
    out, full = ex.run(x), all_outputs
    np.testing.assert_allclose(full["logits"], out["logits"], rtol=1e-5, atol=1e-5)
    top = out["topk_classes"]
    np.testing.assert_array_equal(top, np.argsort(-out["logits"], 1)[:, : top.shape[1]])
    pick = top[:, :, None]  # (N, k, 1)
    for name in ("scores", "contributions"):
        want = np.take_along_axis(full[name], pick, axis=1)
        np.testing.assert_allclose(out[f"topk_{name}"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["topk_bias"], np.take_along_axis(full["bias"], top, 1))
    maps = full["maps"]
    want = np.take_along_axis(maps, top[:, :, None, None, None], axis=1)
    np.testing.assert_allclose(out["topk_maps"], want, rtol=1e-4, atol=1e-4)
    # scores are the maps' spatial means (Eq. 9 maps, mean-pooled)
    np.testing.assert_allclose(maps.mean((3, 4)), full["scores"], rtol=1e-4, atol=1e-4)
    assert explanation_residual(full).max() <= 1e-5


def op_counts(path):
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def head_ops(graph, grid: str) -> Counter:
    """Op counts of the nodes that depend on the feature grid (the backbone's output)."""
    reached, ops = {grid}, Counter()
    for node in graph.graph.node:  # exported graphs are in topological order
        if reached.intersection(node.input):
            reached.update(node.output)
            ops[node.op_type] += 1
    return ops


def test_gathernd_rewritten_as_gather():
    from onnx import TensorProto, helper

    pytest.importorskip("torch")  # the exporter's module (the convert extra)
    from protonmf.converter.export import gathernd_to_gather

    nodes = [
        helper.make_node("Unsqueeze", ["idx", "axes"], ["idx1"], name="u"),
        helper.make_node("GatherND", ["table", "idx1"], ["rows"], name="g1"),
        helper.make_node("GatherND", ["coef", "idx1"], ["coefs"], name="g2"),
    ]
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 2])],
        [
            helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["N", 2, 3, 2]),
            helper.make_tensor_value_info("coefs", TensorProto.FLOAT, ["N", 2]),
        ],
        [
            numpy_helper.from_array(np.array([-1], np.int64), "axes"),
            numpy_helper.from_array(np.arange(24, dtype=np.float32).reshape(4, 3, 2), "table"),
            numpy_helper.from_array(np.arange(4, dtype=np.float32), "coef"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    idx = np.array([[3, 1], [0, 0]], np.int64)
    before = ort_run(model, idx)
    assert gathernd_to_gather(model) == 2
    assert [n.op_type for n in model.graph.node] == ["Gather", "Gather"]  # Unsqueeze gone
    assert "axes" not in {i.name for i in model.graph.initializer}  # and its constant
    onnx.checker.check_model(model, full_check=True)
    after = ort_run(model, idx)
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(after[0], np.arange(24).reshape(4, 3, 2)[idx])


def ort_run(model, idx):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"idx": idx})


def common_structure(m: dict, g) -> None:
    assert [o.name for o in g.graph.output] == list(m["graph"]["outputs"])
    assert g.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert m["graph"]["opset"] == 18 and m["format_version"] == FORMAT_VERSION
    assert any(o.domain in ("", "ai.onnx") and o.version == 18 for o in g.opset_import)
    C, p, D = len(m["classes"]), m["p"], m["feature_dim"]
    sizes = [int(np.prod(i.dims)) for i in g.graph.initializer]
    assert sizes.count(C * p * D) == 1  # the augmented prototypes, stored once


def test_topk_graph_structure(fashion_topk_artifact, lite0_artifact):
    """The top-k head: Lite0's default (1,000 classes) and Fashion exported with it."""
    assert manifest_of(lite0_artifact)["conversion"]["scores"] == "auto"
    for artifact in (fashion_topk_artifact, lite0_artifact):
        m = manifest_of(artifact)
        g = onnx.load(str(artifact / "model.onnx"))
        common_structure(m, g)
        assert (m["graph"]["scores"], m["graph"]["maps"]) == ("topk", "topk")
        ops = op_counts(artifact / "model.onnx")
        assert ops["TopK"] == 1  # top-k classes picked in-graph
        # The head, every node fed by the backbone's feature grid, node for node: pooling;
        # logits (pooled · Σ_i a_i b'_i, the head's size: MatMul + Add); TopK; three
        # Gathers (prototypes, coefficients, bias of the k classes); one MatMul for the
        # k·p maps, whose spatial means are the scores (ReduceMean); three Reshapes; the
        # contributions (Mul). Per-node overhead is the head's cost at batch 1.
        # (pooled: GlobalAveragePool + Flatten, the layout onnxruntime's convolutions keep)
        grid = next(n for n in g.graph.node if n.op_type == "GlobalAveragePool").input[0]
        assert head_ops(g, grid) == Counter(
            GlobalAveragePool=1,
            Flatten=1,
            ReduceMean=1,
            MatMul=2,
            Add=1,
            TopK=1,
            Gather=3,
            Reshape=3,
            Mul=1,
        )
        assert ops["GatherND"] == 0 and ops["Einsum"] == 0
        # no C·p-filter conv, and no (D, C·p) matmul: all-class scores are not computed
        C, p, D = len(m["classes"]), m["p"], m["feature_dim"]
        inits = {i.name: tuple(i.dims) for i in g.graph.initializer}
        convs = [n for n in g.graph.node if n.op_type == "Conv"]
        assert all(inits.get(n.input[1], (0,))[0] != C * p for n in convs)
        assert (C, p, D) in inits.values()


def test_all_classes_graph_structure(fashion_artifact):
    """The Fashion default (10 classes ≤ 2k: auto → all): Eq. 8's prototypes as one 1×1
    convolution of C·p filters, then mean pooling, coefficients and bias — no TopK, no
    Gather, no (constant) bias output; the black box's pooling and linear layer are gone."""
    m = manifest_of(fashion_artifact)
    g = onnx.load(str(fashion_artifact / "model.onnx"))
    common_structure(m, g)
    assert (m["conversion"]["scores"], m["conversion"]["maps"]) == ("auto", "auto")
    assert (m["graph"]["scores"], m["graph"]["maps"]) == ("all", "all")
    C, p, D = len(m["classes"]), m["p"], m["feature_dim"]
    inits = {i.name: tuple(i.dims) for i in g.graph.initializer}
    (conv,) = [n for n in g.graph.node if inits.get(n.input[-1]) == (C * p, D, 1, 1)]
    assert conv.op_type == "Conv"
    # maps (Reshape), scores (ReduceMean), contributions (Mul), logits (ReduceSum, Add), and
    # pooled (format 4: the residual split of any class needs it) as GlobalAveragePool +
    # Flatten: beside the conv, a ReduceMean cost ~4% at batch 1 (export.pooled_as_global_pool)
    assert head_ops(g, conv.input[0]) == Counter(
        Conv=1, Reshape=1, ReduceMean=1, Mul=1, ReduceSum=1, Add=1, GlobalAveragePool=1, Flatten=1
    )
    ops = op_counts(fashion_artifact / "model.onnx")
    assert ops["TopK"] == ops["Gather"] == ops["MatMul"] == ops["Gemm"] == ops["Expand"] == 0


def test_cuda_request_without_gpu_is_an_error(fashion_artifact):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA provider present: covered by the gpu-marked test")
    with pytest.raises(ProviderError, match="CUDA was requested"):
        create_session(fashion_artifact / "model.onnx", device="cuda")


def test_cuda_tf32_off_unless_asked():
    from protonmf.graph import cuda_options

    # exact fp32 is the contract; no per-shape benchmarking under adaptive batching
    assert cuda_options() == {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}
    assert cuda_options(tf32=True, search="exhaustive") == {
        "use_tf32": "1",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
    }
    with pytest.raises(ValueError, match="cuDNN search"):
        cuda_options(search="fastest")


@pytest.mark.gpu
def test_cuda_provider_parity(fashion_topk_artifact, fashion_batch):
    """CUDA provider (TF32 off) vs CPU provider: same logits, contributions, top-k maps."""
    ex_cpu, x = fashion_batch
    ex_gpu = GraphSession.load(fashion_topk_artifact, device="cuda")
    assert ex_gpu.provider == "CUDAExecutionProvider"
    got, want = ex_gpu.run(x), ex_cpu.run(x)
    scale = np.abs(want["logits"]).max()
    assert np.abs(got["logits"] - want["logits"]).max() <= 1e-5 * scale
    assert explanation_residual(got).max() <= 1e-5
    np.testing.assert_array_equal(got["topk_classes"], want["topk_classes"])
    maps = want["topk_maps"]
    assert np.abs(got["topk_maps"] - maps).max() <= 1e-5 * np.abs(maps).max()


@pytest.mark.gpu
def test_verify_on_cuda(fashion_artifact, capsys):
    """`protonmf verify --device cuda`: the graph on the GPU vs the timm model on held-out images."""
    code, out = run_cli("verify", fashion_artifact, "--device", "cuda", "--json", capsys=capsys)
    report = json.loads(out)
    assert code == 0 and report["provider"] == "CUDAExecutionProvider"
    assert report["max_rel_logit_diff"] <= 1e-5 and report["top1_agreement"] == 1.0
    print(json.dumps(report))  # recorded by benchmarks/gpu_checks.sh


@pytest.mark.gpu
def test_fp16_variant_measured_on_cuda(fashion_artifact, tmp_path):
    import shutil

    from protonmf.converter.variants import add_variants

    art = tmp_path / "art"
    shutil.copytree(fashion_artifact, art)
    fp16 = add_variants(art, ("fp16",), eval_images=200)["fp16"]
    agreement = fp16["agreement"]
    assert agreement["provider"] == "CUDAExecutionProvider" and agreement["top1_agreement"] >= 0.98
    assert GraphSession.load(art, device="cuda", variant="fp16").provider == "CUDAExecutionProvider"
    print(json.dumps(fp16))


def test_int8_and_fp16_variants(fashion_artifact, tmp_path):
    import shutil

    from protonmf.converter.variants import add_variants

    art = tmp_path / "art"
    shutil.copytree(fashion_artifact, art)
    variants = add_variants(art, ("int8", "fp16"), calibration_images=64, eval_images=200)
    m = manifest_of(art)
    assert set(m["variants"]) == {"int8", "fp16"} and "model.int8.onnx" in m["files"]
    int8 = variants["int8"]["agreement"]
    assert int8["n_images"] == 200 and int8["top1_agreement"] >= 0.95
    assert variants["int8"]["exact"] is False
    fp16 = variants["fp16"]
    assert fp16["agreement"] is not None or "not_measured" in fp16
    ex = GraphSession.load(art, variant="int8")
    samples = load_image_folder(FASHION_DATA / "test", ex.classes)[:8]
    out = ex.run(ex.preprocess([s.open() for s in samples]))
    assert explanation_residual(out).max() <= 1e-4  # the fp32 head still adds up
    ops = op_counts(art / "model.int8.onnx")
    assert ops["QuantizeLinear"] >= 1 and ops["DequantizeLinear"] >= 1
    # the all-class head's prototype conv stays fp32: its weights are not quantized
    g = onnx.load(str(art / "model.int8.onnx")).graph
    C, p, D = len(m["classes"]), m["p"], m["feature_dim"]
    weights = {i.name: i for i in g.initializer}
    (head,) = [
        n
        for n in g.node
        if n.op_type == "Conv"
        and n.input[1] in weights
        and tuple(weights[n.input[1]].dims) == (C * p, D, 1, 1)
    ]
    assert weights[head.input[1]].data_type == onnx.TensorProto.FLOAT
    with pytest.raises(ArtifactError, match="has no 'bf16' graph"):
        GraphSession.load(art, variant="bf16")


def test_verify_lite0_on_scikit_image_photos(lite0_artifact, tmp_path, capsys):
    from PIL import Image
    from skimage import data

    folder = tmp_path / "photos" / "0"  # labels do not matter for exactness
    folder.mkdir(parents=True)
    for name in ("astronaut", "chelsea", "coffee"):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.png")
    code, r = verify_json(lite0_artifact, capsys, "--data", tmp_path / "photos")
    assert code == 0 and r["n_images"] == 3
    assert r["top1_agreement"] == 1.0 and r["max_rel_logit_diff"] <= 1e-5


def test_spinning_off_is_set_on_the_session(fashion_artifact):
    on, _ = create_session(fashion_artifact / "model.onnx")
    off, _ = create_session(fashion_artifact / "model.onnx", spinning=False)
    key = "session.intra_op.allow_spinning"
    assert off.get_session_options().get_session_config_entry(key) == "0"
    try:  # unset (onnxruntime's default: spin) raises, or anything but "0"
        assert on.get_session_options().get_session_config_entry(key) != "0"
    except RuntimeError:
        pass


def test_sessions_with_their_own_thread_counts_agree(fashion_artifact):
    """Two sessions of the graph in one process, each on its own pool (1 and 2 threads, as
    the service's workers split the CPUs): the thread count is set and changes no output."""
    path = fashion_artifact / "model.onnx"
    one, _ = create_session(path, threads=1)
    two, _ = create_session(path, threads=2)
    assert one.get_session_options().intra_op_num_threads == 1
    assert two.get_session_options().intra_op_num_threads == 2
    x = np.random.default_rng(0).random((3, *one.get_inputs()[0].shape[1:]), dtype=np.float32)
    name = one.get_inputs()[0].name
    for a, b in zip(one.run(None, {name: x}), two.run(None, {name: x}), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
