"""A real Prometheus scraping a real `protonmf serve`, with deploy/monitoring's rules loaded:
the metrics the rules and the dashboard read exist, carry the expected values after known
traffic, every rule evaluates, nothing fires on healthy traffic, and a stopped service
turns its alerts pending.

Needs prometheus + promtool (scripts/install_deploy_tools.sh); missing tools fail.
"""

from __future__ import annotations

import io
import os
import re
import signal
import time

import httpx
import pytest
import yaml
from helpers import FASHION_DATA, REPO, dashboard_exprs, run, tool
from PIL import Image
from served import free_port, serve, start_process, stop_process, wait_ready

RULES = REPO / "deploy" / "monitoring" / "prometheus-rules.yaml"
# Images per class sent to /classify (one request) and to /explain (one request each).
CLASSIFY = {"bag": 2, "trouser": 1}
EXPLAIN = {"sneaker": 2, "coat": 1}


@pytest.fixture(scope="module")
def service(fashion_artifact, tmp_path_factory):
    with serve(fashion_artifact, tmp_path_factory.mktemp("service")) as served:
        yield {"url": served.url, "port": int(served.url.rsplit(":", 1)[1]), "proc": served.proc}


@pytest.fixture(scope="module")
def prometheus(service, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "protonmf",
                "scrape_timeout": "1s",
                "static_configs": [{"targets": [f"127.0.0.1:{service['port']}"]}],
            }
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = tmp / "prometheus.log"
    proc = start_process(
        [
            tool("prometheus"),
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        log,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/-/ready", proc, log, timeout=30)
        # One scrape before any traffic: rate() counts increases only after a first sample.
        poll(url, 'up{job="protonmf"} == 1', lambda r: True)
        yield url
    finally:
        stop_process(proc)


def query(prom: str, promql: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": promql}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (promql, body)
    return body["data"]["result"]


def poll(prom: str, promql: str, check, timeout: float = 30) -> list[dict]:
    """Query until ``check(result)`` holds (scrapes and rule evaluations run every 1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        result = query(prom, promql)
        if result and check(result):
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{promql}: {result} after {timeout} s")
        time.sleep(0.5)


def value(result: list[dict]) -> float:
    return float(result[0]["value"][1])


def images(counts: dict[str, int]) -> list[tuple[str, bytes]]:
    return [
        (cls, f.read_bytes())
        for cls, n in counts.items()
        for f in sorted((FASHION_DATA / "test" / cls).glob("*.png"))[:n]
    ]


def png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def traffic(service, prometheus) -> dict:
    """Known requests; returns what the metrics should now say."""
    url = service["url"]
    top1 = []
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post(
            "/classify",
            files=[("images", (f"{cls}.png", blob, "image/png")) for cls, blob in images(CLASSIFY)],
        )
        assert r.status_code == 200, r.text
        top1 += [p["top_k"][0]["class"] for p in r.json()["predictions"]]
        gaps = []
        for _, blob in images(EXPLAIN):
            r = c.post(
                "/explain",
                files={"images": ("x.png", blob, "image/png")},
                data={"interventions": '[{"class": "bag", "prototype": 1}]'},
            )
            assert r.status_code == 200, r.text
            e = r.json()["explanations"][0]
            top1.append(e["top_k"][0]["class"])
            gaps.append(e["exactness"])
        for _ in range(2):  # not an image: 415
            r = c.post("/explain", files={"images": ("a.txt", b"hello" * 20, "text/plain")})
            assert r.status_code == 415, r.text
        r = c.post("/classify", files={"images": ("tiny.png", png((1, 1)), "image/png")})
        assert r.status_code == 422, r.text
    return {"top1": top1, "gaps": gaps, "explain_requests": sum(EXPLAIN.values())}


def test_metrics_page_lints_and_has_what_rules_and_dashboard_read(service, traffic):
    page = httpx.get(f"{service['url']}/metrics", timeout=10).text
    r = run(tool("promtool"), "check", "metrics", input=page)
    assert r.returncode == 0, r.stdout + r.stderr
    exposed = {
        re.split(r"[{ ]", line, maxsplit=1)[0]
        for line in page.splitlines()
        if line and not line.startswith("#")
    }
    rules = RULES.read_text()
    exprs = [e for es in dashboard_exprs().values() for e in es]
    wanted = set(re.findall(r"\b((?:bentoml|protonmf)_[a-z_]+)\b", rules + " ".join(exprs)))
    assert len(wanted) >= 12
    assert wanted <= exposed, wanted - exposed
    # Label names the rules and panels group by.
    for label in (
        "endpoint",
        "http_response_code",
        "stage",
        "class_name",
        "prototype",
        "reason",
        "transport",
        "status",
    ):
        assert f'{label}="' in page, label


def test_scraped_values_match_the_traffic(prometheus, traffic):
    n = len(traffic["top1"])
    poll(prometheus, 'sum(protonmf_predictions_total{job="protonmf"})', lambda r: value(r) == n)
    by_class = poll(
        prometheus,
        'sum by (class_name) (protonmf_predictions_total{job="protonmf"})',
        lambda r: sum(float(s["value"][1]) for s in r) == n,
    )
    assert {s["metric"]["class_name"]: float(s["value"][1]) for s in by_class} == {
        c: float(traffic["top1"].count(c)) for c in set(traffic["top1"])
    }
    poll(
        prometheus,
        'sum(protonmf_prototype_top_contribution_total{job="protonmf"})',
        lambda r: value(r) == n,
    )
    poll(
        prometheus,
        'protonmf_interventions_total{job="protonmf"}',
        lambda r: value(r) == traffic["explain_requests"],
    )
    poll(
        prometheus,
        'protonmf_rejected_requests_total{job="protonmf", reason="unsupported_format"}',
        lambda r: value(r) == 2,
    )
    poll(
        prometheus,
        'protonmf_rejected_requests_total{job="protonmf", reason="too_small"}',
        lambda r: value(r) == 1,
    )
    poll(
        prometheus,
        'sum(bentoml_service_request_total{job="protonmf", endpoint="/explain", '
        'http_response_code="415"})',
        lambda r: value(r) == 2,
    )
    poll(
        prometheus,
        'sum(bentoml_service_request_total{job="protonmf", endpoint="/explain", '
        'http_response_code="200"})',
        lambda r: value(r) == traffic["explain_requests"],
    )
    gap = value(poll(prometheus, 'max(protonmf_exactness_gap_max{job="protonmf"})', lambda r: True))
    assert 0 <= gap <= max(traffic["gaps"]) + 1e-12 and gap < 1e-4
    stages = poll(
        prometheus,
        'sum by (stage) (protonmf_stage_duration_seconds_count{job="protonmf"})',
        lambda r: len(r) >= 3,
    )
    assert {"decode", "infer", "explain"} <= {s["metric"]["stage"] for s in stages}
    # Recording rules evaluate on the live series (the service creates each endpoint's
    # success series at start, so their first sample predates the traffic and the rate
    # sees it).
    poll(
        prometheus,
        'protonmf:requests:rate5m{transport="rest", endpoint="/explain", status="200"}',
        lambda r: value(r) > 0,
    )
    poll(
        prometheus,
        'sum(protonmf_requests_total{job="protonmf", transport="rest", '
        'endpoint="/explain", status="415"})',
        lambda r: value(r) == 2,
    )
    poll(prometheus, "protonmf:images:rate5m", lambda r: True)


def test_every_rule_evaluates_and_healthy_traffic_fires_nothing(prometheus, traffic):
    rules = yaml.safe_load(RULES.read_text())
    names = {r.get("alert") or r.get("record") for g in rules["groups"] for r in g["rules"]}
    deadline = time.monotonic() + 30
    while True:  # each group has run once when every rule reports an evaluation
        loaded = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        got = [r for g in loaded for r in g["rules"]]
        if got and all(not r["lastEvaluation"].startswith("0001") for r in got):
            break
        assert time.monotonic() < deadline, got
        time.sleep(0.5)
    assert {r["name"] for r in got} == names
    assert [r for r in got if r["health"] != "ok"] == []
    # 415/422 are the client's fault: no alert pending or firing.
    assert [r["name"] for r in got if r["type"] == "alerting" and r["state"] != "inactive"] == []


def test_dashboard_queries_run_on_live_data(prometheus, traffic):
    empty = []
    for title, exprs in dashboard_exprs().items():
        for expr in exprs:
            if not query(prometheus, expr):
                empty.append(title)
    # Panels on what the traffic produced must show it.
    for title in (
        "Request rate by endpoint",
        "Predictions by class",
        "Prototype usage",
        "Exactness gap (max)",
        "Rejections by reason",
        "Stage latency p50 / p99",
        "Batch size (micro-batcher)",
        "Scrape targets up",
    ):
        assert title not in empty, title


def test_stopped_service_turns_alerts_pending(service, prometheus, traffic):
    """Last: stops the module's service. up drops to 0 and both availability alerts
    start their `for` countdown."""
    os.killpg(service["proc"].pid, signal.SIGTERM)
    service["proc"].wait(timeout=30)
    poll(prometheus, 'up{job="protonmf"} == 0', lambda r: True)

    def pending(r):
        states = {a["labels"]["alertname"]: a["state"] for a in r}
        return (
            states.get("ProtoNMFTargetDown") == "pending"
            and states.get("ProtoNMFUnavailable") == "pending"
        )

    deadline = time.monotonic() + 20
    while True:
        alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        if pending(alerts):
            break
        assert time.monotonic() < deadline, alerts
        time.sleep(0.5)
