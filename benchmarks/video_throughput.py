"""Per-frame cost of `dinodet predict` on a video against the same frames as JPEG files (issue 20's bar:
decoding and encoding must not make a video dearer than its frames as images).

    python benchmarks/video_throughput.py [--frames 60] [--size 640x480] [--preset tiny] [--rounds 2]
        [--hardware amd-epyc-2vcpu] [--out benchmarks/results]

Makes a video of --frames coco128 photos (resized to --size, MPEG-4 at 30 fps) and writes the same
decoded frames as JPEG files, then runs ``predict_to_folder`` (the library behind ``dinodet
predict``) on both, with the annotated output (``OUT/NAME.mp4`` vs ``OUT/NAME.jpg`` per image) and
without it (``--no-save-images``).  A random-weight model (short side 320, as the video tests'); the
model is built once, so ms/frame excludes start-up.  The four runs alternate over --rounds, so that
a load change on a shared machine hits both inputs alike; the best round of each counts.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from _hw import cpu_name
from PIL import Image

from dinodet.inference.detector import Detector
from dinodet.inference.predict import predict_to_folder

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = Path(os.environ.get("DINODET_COCO128", ROOT.parent / "shared" / "data" / "coco128"))


def make_inputs(folder: Path, frames: int, size: tuple[int, int]) -> tuple[Path, Path]:
    """``folder/clip.mp4`` and ``folder/frames/NNNN.jpg``: the same frames (the JPEGs are the decoded video)."""
    photos = sorted(PHOTOS.rglob("*.jpg"))
    if not photos:
        sys.exit(f"video_throughput: no photos under {PHOTOS} (set DINODET_COCO128)")
    video = folder / "clip.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            image = np.asarray(Image.open(photos[i % len(photos)]).convert("RGB").resize(size))
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    images = folder / "frames"
    images.mkdir()
    with av.open(str(video)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            frame.to_image().save(images / f"{i:04d}.jpg", quality=95)
    return video, images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--size", default="640x480", help="WIDTHxHEIGHT")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--hardware", default="amd-epyc-2vcpu", help="names the result file")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    size = tuple(int(v) for v in args.size.split("x"))
    detector = Detector.from_random(args.preset, size=320, max_size=512)
    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="dinodet-video-bench-") as tmp:
        folder = Path(tmp)
        video, images = make_inputs(folder, args.frames, size)
        predict_to_folder(detector, [str(video)], folder / "warm", max_frames=3, progress=False)
        for _ in range(args.rounds):
            for name, source in (("images", images), ("video", video)):
                for save in (True, False):
                    out = folder / "out"
                    start = time.perf_counter()
                    predict_to_folder(detector, [str(source)], out, threshold=args.threshold, save_images=save,
                                      progress=False)
                    ms = (time.perf_counter() - start) * 1000 / args.frames
                    runs.setdefault(f"{name}{'' if save else ' (no-save-images)'}", []).append(round(ms, 1))
                    shutil.rmtree(out)
    best = {k: min(v) for k, v in runs.items()}
    print(f"{args.frames} frames {size[0]}x{size[1]}, {args.preset} (random weights, short side 320), "
          f"{os.cpu_count()} cores")
    for save in ("", " (no-save-images)"):
        v, i = best[f"video{save}"], best[f"images{save}"]
        print(f"  annotated output{save or ''}: video {v:.1f} ms/frame, JPEG files {i:.1f} ms/image, "
              f"video/images {v / i:.3f}")
    record = {"benchmark": "video_throughput", "hardware": args.hardware, "cpu": cpu_name(),
              "cores": os.cpu_count(), "frames": args.frames, "size": list(size), "preset": args.preset,
              "ms_per_frame_best": best, "ms_per_frame_rounds": runs}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"video_throughput_{args.hardware}.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
