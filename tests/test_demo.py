"""The README's first command after the set-up: scripts/demo.sh converts, verifies, reports,
serves and explains, on free ports and into a temporary artifact folder."""

import os
import subprocess

import pytest
from helpers import REPO
from served import free_port


@pytest.mark.e2e
def test_the_demo_runs_end_to_end(tmp_path):
    art = tmp_path / "fashion-default"
    env = {**os.environ, "ART": str(art), "PORT": str(free_port()), "GRPC_PORT": str(free_port())}
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert '"class": "bag"' in done.stdout  # the explained image's top class, REST and gRPC
    for name in ("manifest.json", "model.onnx", "report.html", "overlay-example.png"):
        assert (art / name).is_file(), name
