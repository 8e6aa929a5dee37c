"""What exact (timm) decoding costs on a camera-sized JPEG, against draft mode.

One of the foolbox photos upscaled to 4000 x 3000 and saved as a quality-90 JPEG (12 MP, as
a phone sends it); the service's decode + resize + crop to the artifact's preprocessing,
CPU-ms per image on one thread: full decoding (the default: timm's pixels) against
PROTONMF_JPEG_DRAFT (decoded at 1/8 scale), in one process, rounds interleaved.

    .venv/bin/python benchmarks/bench_large_jpeg.py [--artifact DIR] [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import _machine
from _machine import RESULTS
from PIL import Image

from protonmf.artifact import Preprocessing, load_manifest, resize_crop
from protonmf.sample_data import imagenet_photo_files
from protonmf.service.decode.images import Limits, decode_image


def camera_jpeg(size=(4000, 3000)) -> bytes:
    photo = Image.open(imagenet_photo_files()[0]).convert("RGB")
    out = io.BytesIO()
    photo.resize(size, Image.Resampling.BICUBIC).save(out, "JPEG", quality=90)
    return out.getvalue()


def cpu_ms(blob: bytes, spec: Preprocessing, limits: Limits, repeats: int = 3) -> float:
    t0 = time.process_time()
    for _ in range(repeats):
        resize_crop(decode_image(blob, limits, spec), spec)
    return (time.process_time() - t0) * 1000 / repeats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--artifact",
        type=Path,
        default=Path("/tmp/bench_service_work/lite0"),
        help="its preprocessing is used (default: bench_service's Lite0)",
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_large_jpeg.json")
    args = ap.parse_args(argv)
    spec = Preprocessing.from_dict(load_manifest(args.artifact)["preprocessing"])
    blob = camera_jpeg()
    modes = {"full (default)": Limits(), "draft": Limits(jpeg_draft=True)}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for limits in modes.values():  # warm
        resize_crop(decode_image(blob, limits, spec), spec)
    for _ in range(args.rounds):
        for mode, limits in modes.items():
            times[mode].append(cpu_ms(blob, spec, limits))
    medians = {m: statistics.median(t) for m, t in times.items()}
    ratio = medians["full (default)"] / medians["draft"]
    print(
        f"12 MP JPEG ({len(blob)} bytes) to {spec.height}x{spec.width}: full "
        f"{medians['full (default)']:.1f} CPU-ms, draft {medians['draft']:.1f} CPU-ms "
        f"(full / draft {ratio:.1f}x)"
    )
    _machine.write_result(
        args.out,
        {
            "machine": _machine.machine_info(),
            "bytes": len(blob),
            "cpu_ms": times,
            "median_cpu_ms": medians,
            "full_over_draft": ratio,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
