"""Static checks of deploy/ and the bentofiles: Dockerfiles (hadolint), Kubernetes manifests
(kustomize render, schemas of two Kubernetes versions, CRD schemas), Prometheus rules
(promtool), the Grafana dashboard, and an offline `bentoml build` + serve of the bento.

Every tool comes from scripts/install_deploy_tools.sh; a missing one fails, never skips.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import (
    CRD_KINDS,
    FASHION_DATA,
    K8S,
    K8S_VERSIONS,
    KIND_IDS,
    MONITORING,
    OVERLAYS,
    REPO,
    crd_errors,
    dashboard,
    dashboard_exprs,
    kubernetes_validate,
    run,
    tool,
)
from served import free_port, start_process, stop_process, wait_ready

DEPLOY = REPO / "deploy"
DOCKER = DEPLOY / "docker"
ORT_GPU = "onnxruntime-gpu==1.26.0"


# --- Dockerfiles ------------------------------------------------------------------------


def dockerfile(kind: str) -> str:
    return (DOCKER / f"Dockerfile.{kind}").read_text()


@pytest.mark.parametrize("kind", OVERLAYS, ids=KIND_IDS)
def test_dockerfile_passes_hadolint(kind):
    r = run(tool("hadolint"), "--no-color", DOCKER / f"Dockerfile.{kind}")
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    """The lint is live: an unpinned base and pip without pins or --no-cache-dir fail."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\n")
    r = run(tool("hadolint"), "--no-color", bad)
    assert r.returncode != 0
    assert "DL3007" in r.stdout and "DL3013" in r.stdout and "DL3042" in r.stdout, r.stdout


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(
        r"\\\n\s*",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in joined.splitlines()
        if line.strip()
    ]


@pytest.mark.parametrize("kind", OVERLAYS, ids=KIND_IDS)
def test_dockerfile_shape(kind):
    text = dockerfile(kind)
    ins = instructions(text)
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) == 2 and froms[0].endswith("AS builder"), froms
    base = re.search(r"ARG (?:PYTHON|CUDA)_IMAGE=(\S+)", text).group(1)
    expected = (
        "python:3.11-slim-bookworm"
        if kind == "cpu"
        else "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04"
    )
    assert base == expected
    last_from = max(i for i, (k, _) in enumerate(ins) if k == "FROM")
    final = ins[last_from:]
    args = {k: [a for i, a in final if i == k] for k in ("USER", "EXPOSE", "ENV", "COPY", "RUN")}
    assert args["USER"] == ["10001:10001"]
    assert args["EXPOSE"] == ["3000 50051"]
    env = " ".join(args["ENV"])
    for setting in (
        "PROTONMF_ARTIFACT=/opt/protonmf/artifact",
        "PROTONMF_GRPC_PORT=50051",
        "BENTOML_DO_NOT_TRACK=true",
        "BENTOML_HOME=/home/protonmf/bentoml",
        f"PROTONMF_DEVICE={'cpu' if kind == 'cpu' else 'cuda'}",
    ):
        assert setting in env, setting
    assert "${ARTIFACT}/ /opt/protonmf/artifact/" in args["COPY"]
    assert "--from=builder /opt/venv /opt/venv" in args["COPY"]
    # The final stage installs no build tools.
    assert not re.search(r"build-essential|gcc|python3-dev|pip install", " ".join(args["RUN"]))
    health = [a for i, a in final if i == "HEALTHCHECK"]
    assert len(health) == 1 and "urllib.request" in health[0]
    assert "http://127.0.0.1:3000/readyz" in health[0]
    entry = [a for i, a in final if i in ("ENTRYPOINT", "CMD")]
    # checks the artifact, then execs bentoml serve; device etc. from the PROTONMF_* env
    command = "python -m protonmf.cli serve /opt/protonmf/artifact --port 3000 --host 0.0.0.0"
    assert json.loads(entry[0]) + json.loads(entry[1]) == command.split()


def test_dockerignore_keeps_the_context_small():
    lines = [
        line
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*", "everything is excluded first, then the few paths let back in"
    for needed in (
        "!service/",
        "!protonmf/",
        "!artifacts/",
        "!deploy/docker/requirements-serve.txt",
    ):
        assert needed in lines, needed


# --- one set of pins ----------------------------------------------------------------------


def requirements() -> list[str]:
    text = (DOCKER / "requirements-serve.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_serving_pins_agree_and_exclude_torch():
    reqs = requirements()
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", r) for r in reqs), reqs
    names = {r.split("==")[0].lower() for r in reqs}
    assert not names & {"torch", "torchvision", "timm", "cvxpy", "onnxscript"}
    assert {"bentoml", "onnxruntime", "grpcio", "prometheus-client"} <= names
    cpu = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    gpu = yaml.safe_load((DEPLOY / "bentofile-gpu.yaml").read_text())
    assert cpu["python"]["packages"] == reqs
    assert gpu["python"]["packages"] == [
        ORT_GPU if r.startswith("onnxruntime==") else r for r in reqs
    ]
    assert f"ARG ORT_GPU_VERSION={ORT_GPU.split('==')[1]}" in dockerfile("gpu")
    for bentofile in (cpu, gpu):
        assert bentofile["python"]["lock_packages"] is False
        assert bentofile["service"] == "protonmf.service.service:ProtoNMFService"
        assert {"name": "BENTOML_DO_NOT_TRACK", "value": "true"} in bentofile["envs"]


# --- Kubernetes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    """`kubectl kustomize` of each overlay, written to a file."""
    out = tmp_path_factory.mktemp("k8s")
    files = {}
    for overlay in OVERLAYS:
        r = run(tool("kubectl"), "kustomize", K8S / "overlays" / overlay)
        assert r.returncode == 0, r.stderr
        files[overlay] = out / f"{overlay}.yaml"
        files[overlay].write_text(r.stdout)
    return files


def docs(path: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS, ids=KIND_IDS)
def test_manifests_validate_strictly(rendered, overlay, version):
    r = kubernetes_validate(rendered[overlay], version)
    assert r.returncode == 0 and "ERROR" not in r.stdout + r.stderr, r.stdout + r.stderr
    # Only the CRD kinds go unchecked here (test_crds_validate_against_their_schemas).
    skipped = set(re.findall(r"Couldn't find schema for kind (\w+)", r.stdout + r.stderr))
    assert skipped == CRD_KINDS
    kinds = set(docs(rendered[overlay]))
    assert kinds == {
        "ServiceAccount",
        "ConfigMap",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        *CRD_KINDS,
    }


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_conversion_jobs_validate_and_agree(tmp_path, version):
    """deploy/k8s/convert: the Indexed Job of shards and the merge Job validate strictly,
    and agree with each other and with `protonmf convert` (N shards = completions =
    parallelism = the N of --shard I/N; the index comes from the pod's annotation)."""
    r = run(tool("kubectl"), "kustomize", K8S / "convert")
    assert r.returncode == 0, r.stderr
    path = tmp_path / "convert.yaml"
    path.write_text(r.stdout)
    v = kubernetes_validate(path, version)
    assert v.returncode == 0 and "ERROR" not in v.stdout + v.stderr, v.stdout + v.stderr
    objs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(r.stdout) if d}
    shards, merge = objs["protonmf-convert-shards"]["spec"], objs["protonmf-convert-merge"]["spec"]
    assert shards["completionMode"] == "Indexed" and shards["completions"] == shards["parallelism"]
    (s,), (m,) = shards["template"]["spec"]["containers"], merge["template"]["spec"]["containers"]
    shard_arg = s["args"][s["args"].index("--shard") + 1]
    assert shard_arg == f"$(SHARD_INDEX)/{shards['completions']}"
    env = {e["name"]: e for e in s["env"]}
    assert "job-completion-index" in env["SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert "--merge" in m["args"] and "--shard" not in m["args"]
    common = [a for a in s["args"] if a not in ("--shard", shard_arg)]
    assert common == [a for a in m["args"] if a != "--merge"]  # same model, data, --out
    from protonmf.cli import build_parser  # the arguments are ones convert takes

    args = build_parser().parse_args([*common, "--shard", "1/4"])
    assert args.shard == (1, 4) and args.out == "/work/artifact"
    claim = objs["protonmf-convert-work"]["metadata"]["name"]
    for job in (shards, merge):
        vols = job["template"]["spec"]["volumes"]
        assert any(v.get("persistentVolumeClaim", {}).get("claimName") == claim for v in vols)


def _container(d):
    return d["Deployment"]["spec"]["template"]["spec"]["containers"][0]


PLANTED = {
    "unknown container field": lambda d: _container(d).update(imagePullPolicyy="Always"),
    "unknown Service field": lambda d: d["Service"]["spec"].update(portz=[]),
    "wrong type": lambda d: d["HorizontalPodAutoscaler"]["spec"].update(maxReplicas="eight"),
    "missing required": lambda d: _container(d).pop("name"),
}


@pytest.mark.parametrize("plant", PLANTED, ids=list(PLANTED))
def test_kubernetes_validate_rejects_planted_errors(rendered, tmp_path, plant):
    objects = docs(rendered["cpu"])
    PLANTED[plant](objects)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(list(objects.values())))
    for version in K8S_VERSIONS:
        r = kubernetes_validate(bad, version)
        assert r.returncode != 0 and "did not validate" in r.stdout + r.stderr, (plant, r.stdout)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=KIND_IDS)
def test_crds_validate_against_their_schemas(rendered, crd_validators, overlay):
    objects = docs(rendered[overlay])
    for kind in CRD_KINDS:
        assert objects[kind]["apiVersion"] == "monitoring.coreos.com/v1"
        assert crd_errors(crd_validators, objects[kind]) == [], kind


CRD_PLANTED = {
    "unknown endpoint field": (
        "ServiceMonitor",
        lambda o: o["spec"]["endpoints"][0].update(intervall="15s"),
    ),
    "interval not a string": (
        "ServiceMonitor",
        lambda o: o["spec"]["endpoints"][0].update(interval=15),
    ),
    "bad duration": (
        "PrometheusRule",
        lambda o: o["spec"]["groups"][1]["rules"][0].update({"for": "5 minutes"}),
    ),
    "unknown rule field": (
        "PrometheusRule",
        lambda o: o["spec"]["groups"][0]["rules"][0].update(exprr="up"),
    ),
    "unknown spec field": ("PrometheusRule", lambda o: o["spec"].update(group=[])),
}


@pytest.mark.parametrize("plant", CRD_PLANTED, ids=list(CRD_PLANTED))
def test_crd_validation_rejects_planted_errors(rendered, crd_validators, plant):
    kind, change = CRD_PLANTED[plant]
    obj = copy.deepcopy(docs(rendered["cpu"])[kind])
    change(obj)
    assert crd_errors(crd_validators, obj), plant


def test_rendered_objects_fit_together(rendered):
    for overlay in OVERLAYS:
        o = docs(rendered[overlay])
        dep, svc, cm = o["Deployment"], o["Service"], o["ConfigMap"]
        pod = dep["spec"]["template"]
        labels = pod["metadata"]["labels"]
        c = pod["spec"]["containers"][0]
        # Selectors of every object select the pods.
        for selector in (
            dep["spec"]["selector"]["matchLabels"],
            svc["spec"]["selector"],
            o["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
            o["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"],
        ):
            assert selector.items() <= labels.items()
        assert (
            o["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items()
            <= svc["metadata"]["labels"].items()
        )
        target = o["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
        assert target["name"] == dep["metadata"]["name"]
        assert "replicas" not in dep["spec"], "the HPA owns the replica count"
        # Ports: container, Service, ServiceMonitor and NetworkPolicy use the same names.
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": 3000, "grpc": 50051}
        assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
            "http": (3000, "http"),
            "grpc": (50051, "grpc"),
        }
        assert o["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "http"
        assert {p["port"] for p in o["NetworkPolicy"]["spec"]["ingress"][0]["ports"]} == set(ports)
        # Probes.
        assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        startup = c["startupProbe"]
        assert startup["httpGet"]["path"] == "/readyz"
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model load"
        # Locked down; writable only where BentoML writes.
        ctx = c["securityContext"]
        assert ctx["readOnlyRootFilesystem"] and ctx["runAsNonRoot"]
        assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"]
        assert pod["spec"]["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        env = {e["name"]: e["value"] for e in c["env"]}
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/tmp", env["BENTOML_HOME"]} <= mounts
        assert {v["name"] for v in pod["spec"]["volumes"]} == {m["name"] for m in c["volumeMounts"]}
        assert all("emptyDir" in v for v in pod["spec"]["volumes"])
        # Graceful stop: the preStop sleep fits in the grace period, with room to drain.
        sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
        assert pod["spec"]["terminationGracePeriodSeconds"] >= sleep + 20
        res = c["resources"]
        assert {"cpu", "memory"} <= res["requests"].keys() & res["limits"].keys()
        # Settings come from the hashed ConfigMap.
        assert c["envFrom"][0]["configMapRef"]["name"] == cm["metadata"]["name"]
        assert cm["metadata"]["name"].startswith("protonmf-config-")
        assert cm["data"]["PROTONMF_ARTIFACT"] == "/opt/protonmf/artifact"
        assert cm["data"]["PROTONMF_GRPC_PORT"] == "50051"
        gpu = overlay == "gpu"
        assert cm["data"]["PROTONMF_DEVICE"] == ("cuda" if gpu else "cpu")
        # CPU: workers × onnxruntime threads fill the CPU limit without oversubscribing it;
        # GPU: one worker and large batches.
        workers, threads = (
            int(cm["data"][k]) for k in ("PROTONMF_WORKERS", "PROTONMF_ORT_THREADS")
        )
        if gpu:
            assert workers == 1 and int(cm["data"]["PROTONMF_MAX_BATCH_SIZE"]) == 32
        else:
            assert workers * threads == int(res["limits"]["cpu"])
        assert c["image"] == f"protonmf:0.1.0-{overlay}"
        assert ("nvidia.com/gpu" in c["resources"]["limits"]) is gpu
        assert ("tolerations" in pod["spec"] and "nodeSelector" in pod["spec"]) is gpu


# --- Prometheus rules and dashboard ----------------------------------------------------------


def test_prometheusrule_carries_the_rule_file():
    script = MONITORING / "render_prometheusrule.py"
    r = run(sys.executable, script, "--check")
    assert r.returncode == 0, f"stale: python {script.relative_to(REPO)} ({r.stderr})"
    cr = yaml.safe_load((K8S / "base" / "prometheusrule.yaml").read_text())
    rules = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    assert cr["spec"]["groups"] == rules["groups"]


def test_promtool_checks_the_rules():
    r = run(tool("promtool"), "check", "rules", MONITORING / "prometheus-rules.yaml")
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_promtool_unit_tests_pass():
    r = run(tool("promtool"), "test", "rules", "prometheus-rules.test.yaml", cwd=MONITORING)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_every_alert_is_tested_firing_and_quiet():
    rules = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert len(alerts) >= 6
    tests = yaml.safe_load((MONITORING / "prometheus-rules.test.yaml").read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert alerts <= fires, alerts - fires
    assert alerts <= quiet, alerts - quiet


def promtool_check_exprs(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """promtool parses PromQL only inside rules: one recording rule per expression."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "exprs.yaml"
    path.write_text(yaml.safe_dump(rules))
    return run(tool("promtool"), "check", "rules", path)


def test_dashboard_panels_and_queries_parse(tmp_path):
    d = dashboard()
    assert d["uid"] == "protonmf-service"
    exprs = dashboard_exprs()
    for title in (
        "Request rate by endpoint",
        "Error ratio (4xx, 5xx)",
        "Latency p50 / p99 by endpoint",
        "Batch size (micro-batcher)",
        "Stage latency p50 / p99",
        "Predictions by class",
        "Prototype usage",
        "Exactness gap (max)",
        "Rejections by reason",
    ):
        assert title in exprs, title
    flat = [e for es in exprs.values() for e in es]
    assert any("histogram_quantile(0.5," in e for e in flat)
    assert any("histogram_quantile(0.99," in e for e in flat)
    r = promtool_check_exprs(flat, tmp_path)
    assert r.returncode == 0 and f"SUCCESS: {len(flat)} rules found" in r.stdout, (
        r.stdout + r.stderr
    )
    # Every panel reads through the data-source variable.
    for panel in d["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_promtool_rejects_a_broken_expression(tmp_path):
    r = promtool_check_exprs(["sum by (le (rate(x[1m]))"], tmp_path)
    assert r.returncode != 0


# --- the bento -----------------------------------------------------------------------------


def build_context(root: Path, artifact: Path) -> Path:
    """What a user's checkout holds after `protonmf convert` and `pip wheel`: sources,
    bentofiles, the artifact and protonmf's wheel under dist/."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for part in ("service", "protonmf", "converter"):
        shutil.copytree(REPO / part, root / part, ignore=ignore)
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / part, root)
    r = run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        root / "dist",
        root,
        cwd=root,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.copy(REPO / "bentofile.yaml", root)
    (root / "deploy").mkdir()
    shutil.copy(DEPLOY / "bentofile-gpu.yaml", root / "deploy")
    shutil.copytree(artifact, root / "artifacts" / "fashion-default")
    return root


def bentoml_build(ctx: Path, bentofile: str, env: dict) -> Path:
    r = run(
        sys.executable,
        "-m",
        "bentoml",
        "build",
        "-f",
        bentofile,
        "-o",
        "tag",
        ctx,
        cwd=ctx,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    tag = r.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    return Path(env["BENTOML_HOME"]) / "bentos" / name / version


def test_bentos_build_offline_without_torch_and_serve(fashion_artifact, tmp_path):
    tool("uv")  # bentoml build would otherwise try to install it
    ctx = build_context(tmp_path / "ctx", fashion_artifact)
    env = dict(os.environ, BENTOML_HOME=str(tmp_path / "bentoml"), BENTOML_DO_NOT_TRACK="true")
    bentos = {
        "cpu": bentoml_build(ctx, "bentofile.yaml", env),
        "gpu": bentoml_build(ctx, "deploy/bentofile-gpu.yaml", env),
    }
    for kind, bento in bentos.items():
        reqs = (bento / "env" / "python" / "requirements.txt").read_text()
        assert not re.search(r"^(torch|torchvision|timm)\b", reqs, re.M), reqs
        assert ("onnxruntime-gpu==" in reqs) is (kind == "gpu")
        assert bool(re.search(r"^onnxruntime==", reqs, re.M)) is (kind == "cpu")
        src = bento / "src"
        for path in (
            "artifacts/fashion-default/manifest.json",
            "artifacts/fashion-default/model.onnx",
        ):
            assert (src / path).is_file(), path
        assert not {"service", "converter", "protonmf", "tests"} & {p.name for p in src.iterdir()}
        (wheel,) = (bento / "env" / "python" / "wheels").glob("protonmf-*.whl")
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
        assert {
            "protonmf/service/service.py",
            "protonmf/service/rest/ui/index.html",
            "protonmf/artifact/store.py",
        } <= names
        assert not any(n.split("/")[0] in ("service", "converter") for n in names)
    dockerfile_gpu = (bentos["gpu"] / "env" / "docker" / "Dockerfile").read_text()
    assert "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04" in dockerfile_gpu

    # Serve the CPU bento as its image would: PROTONMF_ARTIFACT from its envs, relative to
    # the bento's src/ (bentofile envs reach only the image, so pass them here).
    meta = yaml.safe_load((bentos["cpu"] / "bento.yaml").read_text())
    env.update({e["name"]: e["value"] for e in meta["envs"]})
    env["PROTONMF_GRPC_PORT"] = str(free_port())
    port = free_port()
    log = tmp_path / "bento.log"
    # protonmf from the bento's wheel, ahead of this checkout's editable install
    site = tmp_path / "wheel"
    with zipfile.ZipFile(next((bentos["cpu"] / "env/python/wheels").glob("*.whl"))) as z:
        z.extractall(site)
    env["PYTHONPATH"] = str(site)
    proc = start_process(
        [sys.executable, "-m", "bentoml", "serve", str(bentos["cpu"]), "--port", str(port)],
        log,
        env,
        cwd=tmp_path,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/readyz", proc, log)
        image = (FASHION_DATA / "test" / "bag" / "00030.png").read_bytes()
        r = httpx.post(
            f"{url}/classify", files={"images": ("bag.png", image, "image/png")}, timeout=30
        )
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["top_k"][0]["class"] == "bag"
    finally:
        stop_process(proc)
