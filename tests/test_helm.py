"""The Helm chart deploy/helm/protonmf: lints strictly, renders objects that validate against
two Kubernetes versions' schemas and the Prometheus Operator's CRD models, and renders the
same Deployment (and HPA, PDB, NetworkPolicy, Service, monitoring objects) as the Kustomize
overlays: default values = overlays/cpu, values-gpu.yaml = overlays/gpu.

helm and the validators come from scripts/install_deploy_tools.sh; a missing one fails,
never skips.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from helpers import (
    CRD_KINDS,
    K8S,
    K8S_VERSIONS,
    KIND_IDS,
    MONITORING,
    OVERLAYS,
    REPO,
    crd_errors,
    kubernetes_validate,
    run,
    tool,
)

pytestmark = pytest.mark.deploy

CHART = REPO / "deploy" / "helm" / "protonmf"
# The release name that gives the Kustomize names (protonmf, app.kubernetes.io/instance).
RELEASE = "protonmf"
VALUES = {"cpu": [], "gpu": ["-f", CHART / "values-gpu.yaml"]}
KINDS = {
    "ServiceAccount",
    "ConfigMap",
    "Service",
    "Deployment",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
    "NetworkPolicy",
    *CRD_KINDS,
}


def helm(*args) -> str:
    r = run(tool("helm"), *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def template(*args, release: str = RELEASE) -> str:
    return helm("template", release, CHART, "--namespace", "default", *args)


def objects(text: str) -> dict[str, dict]:
    out = {}
    for d in yaml.safe_load_all(text):
        if d:
            assert d["kind"] not in out, f"two {d['kind']}s"
            out[d["kind"]] = d
    return out


@pytest.fixture(scope="module")
def charts(tmp_path_factory) -> dict[str, Path]:
    """`helm template` of the CPU (default) and GPU values, written to a file."""
    out = tmp_path_factory.mktemp("helm")
    files = {}
    for kind in OVERLAYS:
        files[kind] = out / f"{kind}.yaml"
        files[kind].write_text(template(*VALUES[kind]))
    return files


@pytest.fixture(scope="module")
def overlays() -> dict[str, dict[str, dict]]:
    out = {}
    for overlay in OVERLAYS:
        r = run(tool("kubectl"), "kustomize", K8S / "overlays" / overlay)
        assert r.returncode == 0, r.stderr
        out[overlay] = objects(r.stdout)
    return out


# --- lint and schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", OVERLAYS, ids=KIND_IDS)
def test_helm_lint_strict(kind):
    out = helm("lint", "--strict", CHART, *VALUES[kind])
    assert "1 chart(s) linted, 0 chart(s) failed" in out, out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


def test_helm_lint_rejects_unknown_values():
    """values.schema.json: a misspelt key fails instead of being ignored."""
    r = run(tool("helm"), "lint", "--strict", CHART, "--set", "autoscalling.enabled=false")
    assert r.returncode != 0 and "autoscalling" in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kind", OVERLAYS, ids=KIND_IDS)
def test_chart_validates_strictly(charts, kind, version):
    r = kubernetes_validate(charts[kind], version)
    assert r.returncode == 0 and "ERROR" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert set(objects(charts[kind].read_text())) == KINDS


@pytest.mark.parametrize("kind", OVERLAYS, ids=KIND_IDS)
def test_chart_crds_validate_against_their_schemas(charts, crd_validators, kind):
    objs = objects(charts[kind].read_text())
    for crd in CRD_KINDS:
        assert objs[crd]["apiVersion"] == "monitoring.coreos.com/v1"
        assert crd_errors(crd_validators, objs[crd]) == [], crd


def test_chart_carries_the_rule_file():
    """files/prometheus-rules.yaml is a byte copy of deploy/monitoring/prometheus-rules.yaml
    (a chart cannot read outside itself), and the PrometheusRule carries its groups."""
    copy_ = CHART / "files" / "prometheus-rules.yaml"
    assert not copy_.is_symlink()
    assert copy_.read_bytes() == (MONITORING / "prometheus-rules.yaml").read_bytes(), (
        "stale: cp deploy/monitoring/prometheus-rules.yaml deploy/helm/protonmf/files/"
    )
    rule = objects(template())["PrometheusRule"]
    groups = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())["groups"]
    assert rule["spec"] == {"groups": groups}


# --- the chart renders what the overlays render -------------------------------------------


def normalized(obj: dict) -> dict:
    """The spec (ConfigMap: data) without what differs by design: Helm's extra labels and
    annotations on the pod template, and the ConfigMap's name (Kustomize adds a hash)."""
    obj = copy.deepcopy(obj)
    if obj["kind"] == "ConfigMap":
        return obj["data"]
    spec = obj["spec"]
    if obj["kind"] == "Deployment":
        meta = spec["template"]["metadata"]
        meta["labels"] = {
            k: v
            for k, v in meta["labels"].items()
            if not k.startswith(
                ("helm.sh/", "app.kubernetes.io/managed-by", "app.kubernetes.io/version")
            )
        }
        meta.pop("annotations", None)  # checksum/config
        for c in spec["template"]["spec"]["containers"]:
            for source in c.get("envFrom", []):
                source["configMapRef"]["name"] = "protonmf-config"
    if obj["kind"] == "ServiceMonitor":
        spec.pop("jobLabel", None)  # the chart pins job="protonmf" for any release name
    if obj["kind"] == "PrometheusRule":
        # kustomize re-emits the folded `expr: >-` blocks with an extra blank line before
        # their more-indented lines (the same PromQL: whitespace); the chart's copy is
        # verbatim (test_chart_carries_the_rule_file).
        for group in spec["groups"]:
            for rule in group["rules"]:
                rule["expr"] = " ".join(rule["expr"].split())
    return spec


def test_deployment_fields_agree(charts, overlays):
    """Field by field what the issue names (image, probes, ports, resources, env, security
    context), then the whole specs below."""
    for kind in OVERLAYS:
        h, k = objects(charts[kind].read_text()), overlays[kind]
        hpod, kpod = (o["Deployment"]["spec"]["template"]["spec"] for o in (h, k))
        (hc,), (kc,) = hpod["containers"], kpod["containers"]
        for field in (
            "image",
            "ports",
            "startupProbe",
            "readinessProbe",
            "livenessProbe",
            "resources",
            "env",
            "securityContext",
            "volumeMounts",
            "lifecycle",
        ):
            assert hc[field] == kc[field], (kind, field)
        assert hpod["securityContext"] == kpod["securityContext"], kind
        assert hpod["volumes"] == kpod["volumes"], kind
        # The environment the service sees: the ConfigMap behind envFrom.
        assert h["ConfigMap"]["data"] == k["ConfigMap"]["data"], kind
        assert hc["envFrom"][0]["configMapRef"]["name"] == h["ConfigMap"]["metadata"]["name"]


@pytest.mark.parametrize("kind", OVERLAYS, ids=KIND_IDS)
def test_chart_matches_the_overlay(charts, overlays, kind):
    h, k = objects(charts[kind].read_text()), overlays[kind]
    assert set(h) == set(k)
    for name in sorted(set(k) - {"ServiceAccount"}):
        assert normalized(h[name]) == normalized(k[name]), name
    assert h["ServiceAccount"]["automountServiceAccountToken"] is False
    for name, obj in h.items():
        assert obj["metadata"]["name"] == (
            "protonmf-config" if name == "ConfigMap" else "protonmf"
        ), name
        assert k[name]["metadata"]["labels"].items() <= obj["metadata"]["labels"].items(), name


def test_workers_fill_the_cpu_limit(charts):
    for kind in OVERLAYS:
        h = objects(charts[kind].read_text())
        data = h["ConfigMap"]["data"]
        limits = h["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        if kind == "cpu":
            assert int(data["PROTONMF_WORKERS"]) * int(data["PROTONMF_ORT_THREADS"]) == int(
                limits["cpu"]
            )
        else:
            assert data["PROTONMF_DEVICE"] == "cuda" and limits["nvidia.com/gpu"] == "1"


# --- values beyond the overlays -----------------------------------------------------------


def test_a_changed_setting_rolls_the_pods():
    def checksum(*args):
        pod = objects(template(*args))["Deployment"]["spec"]["template"]
        return pod["metadata"]["annotations"]["checksum/config"]

    assert checksum() == checksum()
    assert checksum() != checksum("--set", "config.PROTONMF_MAX_BATCH_SIZE=8")


def test_job_label_keeps_the_rules_job_for_any_release_name():
    h = objects(template(release="prod"))
    assert h["Deployment"]["metadata"]["name"] == "prod-protonmf"
    job_label = h["ServiceMonitor"]["spec"]["jobLabel"]
    assert h["Service"]["metadata"]["labels"][job_label] == "protonmf"


def test_auth_secret_is_off_by_default_and_validates(tmp_path):
    default = objects(template())
    assert "Secret" not in default
    env = default["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert "PROTONMF_API_KEYS" not in {e["name"] for e in env}

    text = template("--set", "auth.enabled=true", "--set", "auth.apiKeys={k1,k2}")
    h = objects(text)
    secret = h["Secret"]
    assert secret["stringData"] == {"api-keys": "k1,k2"}
    (ref,) = [
        e
        for e in h["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]
        if e["name"] == "PROTONMF_API_KEYS"
    ]
    assert ref["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"],
        "key": "api-keys",
    }
    path = tmp_path / "auth.yaml"
    path.write_text(text)
    for version in K8S_VERSIONS:
        r = kubernetes_validate(path, version)
        assert r.returncode == 0 and "ERROR" not in r.stdout + r.stderr, r.stdout + r.stderr

    existing = objects(template("--set", "auth.enabled=true", "--set", "auth.existingSecret=keys"))
    assert "Secret" not in existing
    r = run(tool("helm"), "template", RELEASE, CHART, "--set", "auth.enabled=true")
    assert r.returncode != 0 and "auth.apiKeys" in r.stderr, r.stderr


def test_optional_objects_switch_off():
    h = objects(
        template(
            "--set",
            "autoscaling.enabled=false",
            "--set",
            "replicaCount=3",
            "--set",
            "podDisruptionBudget.enabled=false",
            "--set",
            "networkPolicy.enabled=false",
            "--set",
            "serviceMonitor.enabled=false",
            "--set",
            "prometheusRule.enabled=false",
        )
    )
    assert set(h) == {"ServiceAccount", "ConfigMap", "Service", "Deployment"}
    assert h["Deployment"]["spec"]["replicas"] == 3
