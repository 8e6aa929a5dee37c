"""IOBinding and CUDA graphs (PROTONMF_IO_BINDING, PROTONMF_CUDA_GRAPHS), on the CPU provider.

IOBinding runs here on the CPU provider ("on"), and must give exactly session.run's
outputs. CUDA graphs need a GPU (`enable_cuda_graph`): their bookkeeping — a buffer, a
binding and a graph id per bucket, regular runs before capture, one thread, only the asked
outputs copied back — is checked by building ``BucketGraphs`` on a CPU session, which
ignores the graph ids. Capture and replay themselves need a GPU: the gpu-marked test at
the end runs in ``benchmarks/gpu_checks.sh run`` (step gpu-tests; step iobinding times them).
"""

import asyncio
import threading

import numpy as np
import pytest
from helpers import FASHION_DATA

from protonmf.graph import BucketGraphs, GraphSession, ProviderError
from protonmf.service.engine.model import Model
from protonmf.service.engine.options import ExplainOptions

MAP_OUTPUTS = {"maps", "topk_maps", "presence", "topk_presence"}


def _batch(explainer: GraphSession, n: int, seed: int = 0) -> np.ndarray:
    spec = explainer.preprocessing
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, spec.channels, spec.height, spec.width)).astype(np.float32)


def _subsets(explainer: GraphSession) -> list:
    names = list(explainer.manifest["graph"]["outputs"])
    no_maps = [n for n in names if n not in MAP_OUTPUTS]
    return [None, no_maps, ["logits"], [n for n in names if n in MAP_OUTPUTS] or names[-1:]]


def _assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(params=["all", "topk"])
def artifact(request, fashion_artifact, fashion_topk_artifact):
    """All-scores graph (bias added outside the graph) and top-k graph (int64 classes).
    Both fixtures named here, so the tier hook sees the converted artifacts (service)."""
    return {"all": fashion_artifact, "topk": fashion_topk_artifact}[request.param]


def test_io_binding_on_cpu_equals_session_run(artifact):
    plain = GraphSession.load(artifact, io_binding="off")
    bound = GraphSession.load(artifact, io_binding="on")
    assert not plain.io_binding and bound.io_binding and bound.graphs is None
    assert not GraphSession.load(artifact, io_binding="auto").io_binding  # auto: on with CUDA only
    for n in (1, 5):
        batch = _batch(plain, n, seed=n)
        for outputs in _subsets(plain):
            _assert_same(plain.run(batch, outputs), bound.run(batch, outputs))


def test_io_binding_binds_only_the_requested_outputs(fashion_artifact, monkeypatch):
    ex = GraphSession.load(fashion_artifact, io_binding="on")
    bound: list[list[str]] = []
    real = ex.session.io_binding

    def spy():
        binding, names = real(), []
        bound.append(names)
        orig = binding.bind_output
        binding.bind_output = lambda name, *a, **k: names.append(name) or orig(name, *a, **k)
        return binding

    def no_plain_run(*a, **k):
        raise AssertionError("session.run used with io_binding on")

    monkeypatch.setattr(ex.session, "io_binding", spy)
    monkeypatch.setattr(ex.session, "run", no_plain_run)
    batch = _batch(ex, 2)
    out = ex.run(batch, {"logits", "maps"})
    assert bound == [["logits", "maps"]] and set(out) == {"logits", "maps"}
    out = ex.run(batch)  # every graph output; bias is added outside the graph
    assert bound[-1] == list(ex.manifest["graph"]["outputs"])
    assert set(out) == set(ex.output_shapes)


def test_cuda_graphs_are_refused_without_cuda_or_buckets(fashion_artifact):
    with pytest.raises(ValueError, match="PROTONMF_CUDA_GRAPHS runs on CUDA only"):
        GraphSession.load(fashion_artifact, cuda_graphs=True, buckets=(1, 2))
    with pytest.raises(ValueError, match="PROTONMF_CUDA_GRAPHS needs batch buckets"):
        GraphSession.load(fashion_artifact, device="cuda", cuda_graphs=True, buckets=None)
    with pytest.raises(ValueError, match="io_binding must be"):
        GraphSession.load(fashion_artifact, io_binding="yes")
    if GraphSession.load(fashion_artifact, device="auto").provider != "CUDAExecutionProvider":
        # auto that lands on the CPU: refused once the session says where it runs
        with pytest.raises(ProviderError, match="PROTONMF_CUDA_GRAPHS runs on CUDA only"):
            GraphSession.load(fashion_artifact, device="auto", cuda_graphs=True, buckets=(1, 2))


def test_bucket_graphs_bookkeeping_on_cpu(fashion_topk_artifact, monkeypatch):
    """Buffers, bindings and graph ids per bucket, regular runs before capture, one thread,
    only the asked outputs copied back and never overwritten by a later run."""
    ex = GraphSession.load(fashion_topk_artifact)
    graphs = BucketGraphs(ex.session, [4, 1, 2, 2], device="cpu")
    assert graphs.sizes == (1, 2, 4)
    names = [o.name for o in ex.session.get_outputs()]
    for graph_id, (n, bucket) in enumerate(graphs.buckets.items(), start=1):  # 0 is reserved
        assert bucket.graph_id == graph_id
        assert bucket.options.get_run_config_entry("gpu_graph_id") == str(graph_id)
        assert list(bucket.outputs) == names  # every output bound: a graph cannot vary them
        buffers = [bucket.input, *bucket.outputs.values()]
        assert [v.shape()[0] for v in buffers] == [n] * len(buffers)
        assert bucket.input.device_name() == "cpu"

    runs = []
    real = ex.session.run_with_iobinding

    def spy(binding, options=None):
        runs.append((options.get_run_config_entry("gpu_graph_id"), threading.current_thread().name))
        return real(binding, options)

    monkeypatch.setattr(ex.session, "run_with_iobinding", spy)
    bucket = graphs.buckets[2]
    addresses = (bucket.input.data_ptr(), [v.data_ptr() for v in bucket.outputs.values()])
    results = []
    feed = ex.manifest["graph"]["input"]["name"]
    for seed in range(5):
        batch = _batch(ex, 2, seed)
        out = graphs.run(batch, ["logits", "topk_classes"])
        assert list(out) == ["logits", "topk_classes"]
        _assert_same(out, dict(zip(out, ex.session.run(list(out), {feed: batch}), strict=True)))
        results.append((out, batch))
    # two regular runs (no capture), then the bucket's graph id; always the one thread
    assert [r[0] for r in runs] == ["-1", "-1", "2", "2", "2"]
    assert len({r[1] for r in runs}) == 1 and runs[0][1].startswith("protonmf-cuda-graphs")
    assert graphs.captured() == (2,)
    # the same device buffers every run (what a captured graph replays on)
    assert addresses == (bucket.input.data_ptr(), [v.data_ptr() for v in bucket.outputs.values()])
    # earlier answers are copies, not views of the buffers later runs overwrote
    first, batch = results[0]
    _assert_same(first, dict(zip(first, ex.session.run(list(first), {feed: batch}), strict=True)))
    assert not np.array_equal(first["logits"], results[-1][0]["logits"])

    with pytest.raises(ValueError, match="PROTONMF_CUDA_GRAPHS: a batch of 3 is not one of"):
        graphs.run(_batch(ex, 3), ["logits"])
    with pytest.raises(ValueError, match="PROTONMF_CUDA_GRAPHS needs batch buckets"):
        BucketGraphs(ex.session, None, device="cpu")
    graphs.close()


def test_explainer_and_warm_up_through_bucket_graphs_on_cpu(artifact):
    """The graph path's outputs equal session.run's for every subset (bias included), and
    warm-up runs each bucket past its capture, so every graph is captured before ready."""
    plain = GraphSession.load(artifact)
    model = Model.load(artifact)
    ex = model.graph
    ex.graphs = BucketGraphs(ex.session, (1, 4), device="cpu")
    assert ex.warm_up_runs == BucketGraphs.REGULAR_RUNS + 2
    assert model.warm_up(4) == [4, 1]  # the graph sizes when the caller names none
    assert ex.graphs.captured() == (1, 4)
    assert all(b.runs == ex.warm_up_runs for b in ex.graphs.buckets.values())
    batch = _batch(plain, 4, seed=7)
    for outputs in _subsets(plain):
        _assert_same(plain.run(batch, outputs), ex.run(batch, outputs))
    ex.graphs.close()


def test_data_plane_settings_plumbing(fashion_artifact):
    """PROTONMF_IO_BINDING=on serves the same answers as off, bit for bit; CUDA graphs on
    this CPU machine are refused at load with the variable's name."""
    from protonmf.service.engine.pipeline import Engine
    from protonmf.service.ops.settings import Settings

    blobs = [p.read_bytes() for p in sorted((FASHION_DATA / "test" / "bag").glob("*.png"))[:3]]

    async def answers(io_binding: str):
        plane = Engine.load(
            Settings.from_env(
                {"PROTONMF_ARTIFACT": str(fashion_artifact), "PROTONMF_IO_BINDING": io_binding}
            )
        )
        assert plane.model.graph.io_binding is (io_binding == "on")
        await plane.start()
        try:
            options = ExplainOptions(top_k=3, map_kind="contribution")
            _, outs = await plane.run(blobs)
            return (await plane.classify(blobs, 3), await plane.explain(blobs, options), outs)
        finally:
            await plane.stop()

    off, on = asyncio.run(answers("off")), asyncio.run(answers("on"))
    assert off[0] == on[0] and off[1] == on[1]
    for a, b in zip(off[2], on[2], strict=True):
        _assert_same(a, b)

    env = {"PROTONMF_ARTIFACT": str(fashion_artifact), "PROTONMF_CUDA_GRAPHS": "true"}
    with pytest.raises(ValueError, match="PROTONMF_CUDA_GRAPHS runs on CUDA only"):
        Engine.load(Settings.from_env(env))
    with pytest.raises(ValueError, match="PROTONMF_CUDA_GRAPHS needs batch buckets"):
        Engine.load(
            Settings.from_env({**env, "PROTONMF_DEVICE": "cuda", "PROTONMF_BATCH_BUCKETS": "off"})
        )


def test_cuda_graph_provider_option():
    from protonmf.graph import cuda_options

    assert "enable_cuda_graph" not in cuda_options()
    assert cuda_options(graphs=True)["enable_cuda_graph"] == "1"


@pytest.mark.gpu
def test_cuda_io_binding_and_graphs_equal_session_run(fashion_topk_artifact):
    """On a GPU (benchmarks/gpu_checks.sh run): IOBinding ("auto" turns it on with CUDA) and
    CUDA graphs give session.run's outputs on the CUDA provider; warm-up captures each
    bucket's graph; replays read each new batch (update_inplace), not the warm-up's."""
    plain = GraphSession.load(fashion_topk_artifact, device="cuda", io_binding="off")
    auto = GraphSession.load(fashion_topk_artifact, device="cuda", io_binding="auto")
    assert plain.provider == auto.provider == "CUDAExecutionProvider" and auto.io_binding
    model = Model.load(fashion_topk_artifact, device="cuda", cuda_graphs=True, buckets=(1, 4))
    graphs = model.graph.graphs
    assert model.warm_up(4) == [4, 1] and graphs.captured() == (1, 4)
    worst = {}
    for n in (1, 4):
        for seed in (n, n + 10):
            batch = _batch(plain, n, seed=seed)
            for outputs in _subsets(plain):
                want = plain.run(batch, outputs)
                for name, ex in (("iobinding", auto), ("cuda-graphs", model.graph)):
                    got = ex.run(batch, outputs)
                    assert list(got) == list(want)
                    for k in want:
                        np.testing.assert_allclose(
                            got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=f"{name} {k}"
                        )
                        diff = float(np.abs(got[k].astype(np.float64) - want[k]).max())
                        worst[name] = max(worst.get(name, 0.0), diff)
    print(f"max |Δ| against session.run on CUDA: {worst}")  # recorded by gpu_checks.sh
    with pytest.raises(ValueError, match="not one of the batch buckets"):
        model.graph.run(_batch(plain, 3))
