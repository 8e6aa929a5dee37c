"""Acceptance run (issue #16): schemathesis against the served OpenAPI spec (/docs.json),
every operation, every phase (examples, coverage, fuzzing); passes when at least
``--min-cases`` cases ran (schemathesis's own count) and none was answered with a status
>= 500 (its ``not_a_server_error`` check, and every response in its NDJSON report), nor
failed at the network level (a reset or a timeout counts as a failure too).

    .venv/bin/python -m tests.acceptance.check_schemathesis ARTIFACT   # ~3,300 cases
    .venv/bin/python -m tests.acceptance.check_schemathesis ARTIFACT -n 20 --min-cases 200

(from the repository root: tests.acceptance is a package there)

schemathesis is looked up as $SCHEMATHESIS (a path), then beside this Python, then on
PATH (`.venv/bin/pip install schemathesis`: it changes none of the pinned packages).
Exit 0: passed; 1: 5xx or errors (each printed: endpoint, request, response); 2: usage.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from tests.acceptance.common import served


def schemathesis_bin() -> str:
    found = os.environ.get("SCHEMATHESIS") or shutil.which(
        "schemathesis",
        path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    if not found:
        raise SystemExit(
            "schemathesis not found: .venv/bin/pip install schemathesis, or set "
            "SCHEMATHESIS to its executable"
        )
    return found


def _text(body, limit=400) -> str:
    if isinstance(body, dict) and "$base64" in body:
        raw = base64.b64decode(body["$base64"])
    elif isinstance(body, dict) and "string" in body:
        raw = body["string"].encode()
    else:
        raw = (body or "").encode() if isinstance(body, str) else json.dumps(body).encode()
    text = raw[:limit].decode("utf-8", "replace")
    return text + (f"… ({len(raw)} bytes)" if len(raw) > limit else "")


def read_report(path: Path) -> dict:
    """Cases, statuses per operation, 5xx and network errors from schemathesis's NDJSON."""
    seen, statuses, bad, errors = set(), collections.defaultdict(collections.Counter), [], []
    for line in path.read_text().splitlines():
        event = json.loads(line)
        ((kind, body),) = event.items()
        if kind == "NonFatalError":
            errors.append(f"{body.get('label')}: {str(body.get('info') or body)[:400]}")
        if kind != "ScenarioFinished":
            continue
        recorder = body.get("recorder") or {}
        for case_id, interaction in (recorder.get("interactions") or {}).items():
            key = (body.get("id"), case_id)
            if key in seen:
                continue
            seen.add(key)
            request, response = interaction["request"], interaction.get("response")
            op = urlsplit(request["uri"]).path  # every method of a path together
            if response is None:
                statuses[op]["no response"] += 1
                errors.append(f"{op}: no response ({_text(request.get('body'))})")
                continue
            code = response["status_code"]
            statuses[op][code] += 1
            if code >= 500:
                bad.append(
                    {
                        "endpoint": op,
                        "status": code,
                        "request_headers": request.get("headers"),
                        "request_body": _text(request.get("body")),
                        "response": _text(response.get("content")),
                    }
                )
    return {"cases": len(seen), "statuses": statuses, "server_errors": bad, "errors": errors}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("artifact", type=Path)
    ap.add_argument(
        "-n",
        "--max-examples",
        type=int,
        default=600,
        help="cases per operation and phase (default 600: ~3,300 cases, ~80 s on 2 vCPUs)",
    )
    ap.add_argument("--min-cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument(
        "--workers",
        default="1",
        help="schemathesis's concurrent workers (1: with 2 its fuzzing of an operation sometimes ends early)",
    )
    ap.add_argument("--request-timeout", type=float, default=30.0)
    ap.add_argument("--report-dir", type=Path, help="keep schemathesis's reports here")
    ap.add_argument("--show-output", action="store_true", help="print schemathesis's own output")
    ap.add_argument(
        "--st-arg",
        action="append",
        default=[],
        help="an extra schemathesis argument (repeat), e.g. --st-arg=--include-path=/explain",
    )
    args = ap.parse_args(argv)
    exe = schemathesis_bin()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="protonmf-st-") as tmp:
        report_dir = args.report_dir or Path(tmp) / "report"
        with served(args.artifact) as s:
            cmd = [
                exe,
                "run",
                f"{s.url}/docs.json",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                str(args.max_examples),
                "--seed",
                str(args.seed),
                "--workers",
                str(args.workers),
                "--request-timeout",
                str(args.request_timeout),
                "--no-shrink",
                "--continue-on-failure",
                "--report",
                "ndjson",
                "--report-dir",
                str(report_dir),
                *args.st_arg,
            ]
            env = dict(os.environ, NO_COLOR="1")
            # cwd: schemathesis keeps a .schemathesis/ cache in its working directory
            run = subprocess.run(
                cmd, capture_output=True, text=True, env=env, timeout=3600, cwd=tmp
            )
            alive = s.proc.poll() is None
            import httpx

            ready = alive and httpx.get(f"{s.url}/readyz", timeout=5).status_code == 200
        reports = sorted(report_dir.glob("*.ndjson"))
        if not reports:
            print(run.stdout[-3000:], run.stderr[-3000:], sep="\n")
            print("FAIL: schemathesis wrote no report")
            return 1
        result = read_report(reports[-1])
    seconds = time.monotonic() - t0
    if args.show_output or run.returncode not in (0, 1):
        print(run.stdout[-6000:], run.stderr[-3000:], sep="\n")
    print(f"schemathesis {' '.join(cmd[1:3])} … (exit {run.returncode}), {seconds:.0f} s")
    for op, counter in sorted(result["statuses"].items()):
        print(
            f"  {op:24} {sum(counter.values()):5}  "
            + " ".join(f"{k}×{v}" for k, v in sorted(counter.items(), key=str))
        )
    total5 = len(result["server_errors"])
    # schemathesis's own count of cases sent; the report may record fewer interactions
    generated = re.search(r"(\d+) generated", run.stdout)
    cases = int(generated.group(1)) if generated else result["cases"]
    print(
        f"cases {cases} (schemathesis's count; {result['cases']} recorded in its report; "
        f"minimum {args.min_cases}), status >= 500: {total5}, network errors: "
        f"{len(result['errors'])}, schemathesis exit {run.returncode} (non-zero: a check "
        f"failed), server alive and ready after: {ready}"
    )
    for item in result["server_errors"][:50]:
        print(json.dumps(item, ensure_ascii=False))
    for error in result["errors"][:20]:
        print("error:", error)
    if run.returncode != 0 and not args.show_output:
        print(run.stdout[-4000:])
    ok = (
        cases >= args.min_cases
        and total5 == 0
        and not result["errors"]
        and ready
        and run.returncode == 0
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
