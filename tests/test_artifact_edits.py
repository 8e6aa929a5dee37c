"""Edited or corrupt artifacts (checksums updated, so only the contents can tell): every
command that loads one refuses it in one line with the reason, exit 2, no traceback."""

import json
import shutil
import subprocess
import sys

import pytest
from helpers import REPO

from protonmf.artifact import sha256_file


def _edit_manifest(art, fn):
    m = json.loads((art / "manifest.json").read_text())
    fn(m)
    (art / "manifest.json").write_text(json.dumps(m))


def _classes(n):
    def edit(m):
        m["classes"] = (m["classes"] + [f"extra{i}" for i in range(n)])[:n]
        m["class_descriptions"] = None

    return edit


def _corrupt_header(art):
    f = art / "prototypes.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"{not json at all" + b"\x00" * 16
    f.write_bytes(bytes(data))
    _edit_manifest(art, lambda m: m["files"].update({f.name: sha256_file(f)}))


EDITS = {
    # the typed manifest refuses a class list that its per-class diagnostics contradict
    "9 classes": (lambda a: _edit_manifest(a, _classes(9)), "per_class has 10 entries for 9"),
    "11 classes": (lambda a: _edit_manifest(a, _classes(11)), "per_class has 10 entries for 11"),
    "p = 4": (lambda a: _edit_manifest(a, lambda m: m.update(p=4)), "manifest implies"),
    "input size": (
        lambda a: _edit_manifest(a, lambda m: m["preprocessing"].update(height=64)),
        "the graph's input is",
    ),
    "safetensors header": (_corrupt_header, "prototypes.safetensors is unreadable"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_artifact_refused_in_one_line(edit, fashion_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(fashion_artifact, art)
    apply, reason = EDITS[edit]
    apply(art)
    cli = [sys.executable, "-m", "protonmf.cli"]
    commands = [["inspect", art], ["serve", art, "--port", "0"]]
    if edit == "9 classes":  # each command's own start-up (torch for verify) is slow
        commands += [["inspect", art, "--json"], ["verify", art], ["evaluate", art]]
    for args in commands:
        r = subprocess.run(
            [*cli, *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=60
        )
        assert r.returncode == 2, (args, r.stdout[-500:], r.stderr[-2000:])
        assert "Traceback" not in r.stderr and reason in r.stderr, (args, r.stderr[-2000:])
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.e2e
def test_killed_conversion_leaves_nothing_loadable_and_rerun_cleans(tmp_path):
    """kill -9 during a conversion: no artifact at --out; the next run removes the scratch
    folder the killed one left beside it, and writes a complete artifact."""
    import signal
    import time

    from helpers import FASHION_DATA, FASHION_MODEL

    from protonmf.artifact import load_manifest

    out = tmp_path / "art"
    cmd = [
        sys.executable,
        "-m",
        "protonmf.cli",
        "convert",
        "--quiet",
        "--model",
        str(FASHION_MODEL),
        "--data",
        str(FASHION_DATA),
        "--max-per-class",
        "20",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".art.*")) and time.monotonic() < deadline:
            assert proc.poll() is None, "conversion ended before a scratch folder appeared"
            time.sleep(0.05)
        left = list(tmp_path.glob(".art.*"))
        assert left, "no scratch folder beside the output within 120 s"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists() and list(tmp_path.glob(".art.*"))
    assert subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=300).returncode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    load_manifest(out)
