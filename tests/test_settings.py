"""Settings (one class for every PROTONMF_* variable) and the micro-batcher, without servers."""

import asyncio
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO

from protonmf.service.engine.batching import MicroBatcher
from protonmf.service.ops.errors import NotReady, Overloaded
from protonmf.service.ops.settings import Settings, SettingsError


def test_limits_and_types_from_env():
    s = Settings.from_env(
        {
            "PROTONMF_MAX_IMAGES": "4",
            "PROTONMF_JPEG_DRAFT": "false",
            "PROTONMF_DEVICE": "cuda",
            "PROTONMF_BATCH_WAIT_MS": "2.5",
            "OTHER": "ignored",
        }
    )
    assert s.limits().max_images == 4 and s.limits().jpeg_draft is False
    assert s.device == "cuda" and s.batch_wait_ms == 2.5
    assert Settings.from_env({}).limits().max_images == 16  # the Limits default


@pytest.mark.parametrize(
    "env, match",
    [
        (
            {"PROTONMF_MAX_BYTES": "0"},
            "PROTONMF_MAX_BYTES: Input should be greater than or equal to 1",
        ),
        ({"PROTONMF_DEVICE": "tpu"}, "PROTONMF_DEVICE: Input should be 'cpu', 'cuda' or 'auto'"),
        ({"PROTONMF_WORKERS": "two"}, "PROTONMF_WORKERS: Input should be a valid integer"),
        ({"PROTONMF_MAX_BATCHSIZE": "8"}, "unknown setting.*PROTONMF_MAX_BATCHSIZE"),
    ],
)
def test_bad_settings_name_the_variable(env, match):
    with pytest.raises(SettingsError, match=match):
        Settings.from_env(env)


def test_removed_setting_warns_and_is_ignored(caplog):
    Settings.from_env({"PROTONMF_BATCH_PATH": "http"})
    assert "PROTONMF_BATCH_PATH is ignored" in caplog.text


@pytest.mark.parametrize(
    "files, want",
    [
        ({"cpu.max": "150000 100000\n"}, 2),  # v2: 1.5 CPUs, rounded up
        ({"cpu.max": "max 100000\n"}, None),  # v2, no limit
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, none
        ({}, None),  # no cgroup files
    ],
)
def test_available_cpus_follow_a_cgroup_cpu_limit(tmp_path, files, want):
    from protonmf.service.ops.settings import available_cpus

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    cpus = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == (cpus if want is None else min(cpus, want))


def test_a_cgroup_limit_sizes_threads_and_decoders(monkeypatch):
    """A container limited to 1 CPU on a bigger machine: one onnxruntime thread and one
    decoding thread per worker, not one per core of the node."""
    import protonmf.service.ops.settings as settings_module

    monkeypatch.setattr(settings_module, "available_cpus", lambda root=None: 1)
    monkeypatch.setattr(settings_module.os, "sched_getaffinity", lambda pid: set(range(8)))
    s = Settings.from_env({})
    assert s.ort_threads_per_worker() == 1 and s.decode_thread_count() == 1
    assert Settings.from_env({"PROTONMF_DECODE_THREADS": "3"}).decode_thread_count() == 3


def test_ort_threads_share_the_cpus_between_workers():
    from protonmf.service.ops.settings import available_cpus

    cpus = available_cpus()
    if cpus == len(os.sched_getaffinity(0)):  # no cgroup CPU limit below the affinity
        assert Settings.from_env({}).ort_threads_per_worker() is None  # onnxruntime's choice
    two = Settings.from_env({"PROTONMF_WORKERS": "2"})
    assert two.ort_threads_per_worker() == max(1, cpus // 2)
    many = Settings.from_env({"PROTONMF_WORKERS": str(cpus * 4)})
    assert many.ort_threads_per_worker() == 1  # never 0
    assert (
        Settings.from_env(
            {"PROTONMF_WORKERS": "2", "PROTONMF_ORT_THREADS": "3"}
        ).ort_threads_per_worker()
        == 3
    )


def test_configuration_doc_is_current():
    doc = subprocess.run(
        [sys.executable, "-m", "protonmf.service.ops.settings", "--markdown"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert (REPO / "docs" / "configuration.md").read_text() == doc, (
        "docs/configuration.md is stale: python -m protonmf.service.ops.settings --markdown > docs/configuration.md"
    )
    for name in Settings.model_fields:
        assert f"`PROTONMF_{name.upper()}`" in doc


def test_every_variable_the_product_reads_is_a_setting():
    """No PROTONMF_* variable is read outside settings.py (one place, typed)."""
    import re

    read = set()
    for folder in ("service", "protonmf", "converter"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name == "settings.py":
                continue
            text = path.read_text()
            read |= set(re.findall(r"environ(?:\.get)?\(?\[?\s*[\"']PROTONMF_([A-Z0-9_]+)", text))
    assert not read, f"read outside Settings: {sorted(read)}"


# --- the micro-batcher ----------------------------------------------------------------


def _double(batch: np.ndarray, outputs=None) -> dict:
    _double.sizes.append(len(batch))
    return {"logits": batch * 2.0}


def _per_image(outputs: dict) -> list[dict]:
    return [{"logits": v} for v in outputs["logits"]]


def _batcher(run=_double, **kw) -> MicroBatcher:
    _double.sizes = []
    return MicroBatcher(run, _per_image, **kw)


def test_concurrent_submits_merge_and_keep_their_order():
    async def scenario():
        b = _batcher(max_batch=8)
        b.start()
        requests = [
            [np.full(2, i * 10 + j, np.float32) for j in range(n)]
            for i, n in enumerate((1, 3, 2, 5))
        ]
        results = await asyncio.gather(*(b.submit(r) for r in requests))
        await b.stop()
        return requests, results

    requests, results = asyncio.run(scenario())
    for items, outs in zip(requests, results, strict=True):
        assert [o["logits"].tolist() for o in outs] == [(x * 2).tolist() for x in items]
    assert sum(_double.sizes) == 11 and max(_double.sizes) <= 8
    assert len(_double.sizes) < 4, "four concurrent requests should share batches"


def test_queue_bound_and_latency_bound_refuse_with_overloaded():
    async def scenario():
        slow_started = asyncio.Event()

        def slow(batch, outputs=None):
            slow_started.set()
            import time

            time.sleep(0.3)
            return {"logits": batch}

        b = _batcher(run=slow, max_batch=1, max_queue=3, max_latency_s=0.1)
        b.start()
        first = asyncio.create_task(b.submit([np.zeros(1)]))
        await slow_started.wait()  # the model is busy with the first image
        second = asyncio.create_task(b.submit([np.ones(1)]))  # waits > 0.1 s: refused
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="limit 3") as full:
            await b.submit([np.ones(1)] * 3)
        outcomes = await asyncio.gather(first, second, return_exceptions=True)
        await b.stop()
        return full.value, outcomes

    full, (first, second) = asyncio.run(scenario())
    assert full.reason == "queue_full" and full.status == 503
    assert first[0]["logits"].tolist() == [0.0]
    assert isinstance(second, Overloaded) and second.reason == "queue_timeout"


def test_cancelled_callers_never_reach_the_model_and_stop_refuses():
    seen = []

    def record(batch, outputs=None):
        seen.extend(batch.ravel().tolist())
        return {"logits": batch}

    async def scenario():
        b = _batcher(run=record, max_batch=4)
        b.start()
        gone = asyncio.create_task(b.submit([np.full(1, 7.0)]))
        await asyncio.sleep(0)  # queued, not yet taken
        gone.cancel()
        kept = await b.submit([np.zeros(1)])
        await asyncio.gather(gone, return_exceptions=True)
        await b.stop()
        with pytest.raises(NotReady):
            await b.submit([np.zeros(1)])
        return kept

    kept = asyncio.run(scenario())
    assert kept[0]["logits"].tolist() == [0.0]
    assert 7.0 not in seen and seen == [0.0]


def test_a_failing_batch_fails_its_images_only():
    calls = []

    def flaky(batch, outputs=None):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("graph failed")
        return {"logits": batch}

    async def scenario():
        b = _batcher(run=flaky, max_batch=1)
        b.start()
        first = await asyncio.gather(b.submit([np.zeros(1)]), return_exceptions=True)
        second = await b.submit([np.ones(1)])
        await b.stop()
        return first[0], second

    first, second = asyncio.run(scenario())
    assert isinstance(first, RuntimeError) and second[0]["logits"].tolist() == [1.0]


def test_buckets_pad_to_the_next_size_and_drop_the_padding():
    seen = []

    def run(batch, outputs=None):
        seen.append((len(batch), outputs))
        return {"logits": batch * 2.0}

    async def scenario():
        b = MicroBatcher(run, _per_image, max_batch=8, buckets=(1, 2, 4, 8))
        b.start()
        items = [np.full(2, float(i)) for i in range(3)]
        out = await b.submit(items, frozenset({"logits"}))
        await b.stop()
        return items, out

    items, out = asyncio.run(scenario())
    assert [o["logits"].tolist() for o in out] == [(x * 2).tolist() for x in items]
    assert seen == [(4, frozenset({"logits"}))]  # 3 images ran as a bucket of 4


def test_a_batch_fetches_the_union_of_what_its_images_need():
    seen = []

    def run(batch, outputs=None):
        seen.append(outputs)
        return {"logits": batch}

    async def scenario():
        gate = asyncio.Event()
        b = MicroBatcher(run, _per_image, max_batch=8, wait_s=0.05)
        b.start()
        await asyncio.gather(
            b.submit([np.zeros(1)], frozenset({"logits"})),
            b.submit([np.ones(1)], frozenset({"logits", "maps"})),
        )
        await asyncio.gather(
            b.submit([np.zeros(1)], frozenset({"logits"})), b.submit([np.ones(1)], None)
        )
        gate.set()
        await b.stop()

    asyncio.run(scenario())
    assert seen == [frozenset({"logits", "maps"}), None]  # None: every output


@pytest.mark.parametrize(
    "value, provider, expected",
    [
        ("auto", "CPUExecutionProvider", None),
        ("auto", "CUDAExecutionProvider", (1, 2, 4, 8, 16, 32)),
        ("off", "CUDAExecutionProvider", None),
        ("1,3,64", "CPUExecutionProvider", (1, 3, 32)),  # capped at the limit, which is a bucket
    ],
)
def test_bucket_settings(value, provider, expected):
    s = Settings.from_env({"PROTONMF_BATCH_BUCKETS": value})
    assert s.buckets(provider) == expected
    with pytest.raises(SettingsError, match="PROTONMF_BATCH_BUCKETS"):
        Settings.from_env({"PROTONMF_BATCH_BUCKETS": "1,,2"})


def test_serve_refuses_settings_this_machine_cannot_run_in_one_line(fashion_artifact):
    """`protonmf serve` loads the artifact as a worker would before it starts BentoML: a
    setting that fails there (CUDA graphs on the CPU) exits 2 with its reason, instead of a
    worker that BentoML restarts forever (the server never exited before)."""
    env = dict(os.environ, PROTONMF_CUDA_GRAPHS="true", BENTOML_DO_NOT_TRACK="true")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "protonmf.cli",
            "serve",
            str(fashion_artifact),
            "--port",
            "0",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 2, (r.stdout[-500:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "PROTONMF_CUDA_GRAPHS runs on CUDA only" in r.stderr
