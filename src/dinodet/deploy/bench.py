"""``dinodet bench``: inference / training speed of every mode against the reference, in one process.

Random weights and random images: speed does not depend on what the model learned.  Every record
is measured in the same run as its baseline (``reference`` for inference, ``reference`` for
training), so the speed-up column compares like with like on the machine at hand.

Record fields: ``mode``, ``task`` (infer | train), ``ms`` (per image for infer, per step for
train), ``img_per_s``, ``peak_mem_gb`` (CUDA peak allocated memory; None on CPU, where PyTorch
keeps no allocator statistics), ``speedup`` (reference ms / this ms), ``first_s`` (the first call,
including loading and compilation), ``setup_s`` (export / quantisation before it; exported rows),
``threads`` (the thread settings that ran).

Exported backends (CPU inference): ``onnxruntime``, ``openvino`` and ``openvino_int8`` (``EXPORTED``)
time the same random-weight model exported inside the run, in a temporary folder: ONNX with the
benchmark's fixed input shape, run by onnxruntime, and for OpenVINO exported as ``to_openvino`` does
(fully-connected FFNs for ``openvino``, 1x1-convolution FFNs for ``openvino_int8``), run from the ONNX
file, and for int8 NNCF-quantised to an IR calibrated on ``calib_data`` (default: a few noise images,
which is fine for speed; give real images for a realistic int8 graph).  The export is not in the per-image time; it
is reported as ``setup_s``, and the load + compile + first image as ``first_s``.
"""
from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import MAX_IMAGE_SIDE, DINOConfig
from ..errors import ConfigError, first_line
from ..files import write_json_atomic
from ..inference.modes import MODES, ModeRunner, autocast, compute_dtype, supported_modes
from ..models.attention import configure_msda
from ..models.build import build_model
from ..models.criterion import build_criterion
from ..models.dino import DINO
from ..presets import get_preset
from ..targets import Target

#: Training-step recipes: (forced MSDA backend or None for the config's, amp, channels_last, fused AdamW).
TRAIN_MODES: dict[str, tuple[str | None, str, bool, bool]] = {
    "reference": ("pytorch", "off", False, False),
    "exact": (None, "off", False, True),
    "bf16": (None, "bf16", True, True),
}


log = logging.getLogger(__name__)

@dataclass
class BenchRecord:
    """One row of the table: ``ms`` per image (infer) or per step (train); ``peak_mem_gb`` None on CPU;
    ``speedup`` = baseline ms / ms within the task; ``msda`` the backend that actually ran."""

    mode: str
    task: str
    ms: float
    img_per_s: float
    peak_mem_gb: float | None
    speedup: float
    msda: str = ""
    first_s: float | None = None
    setup_s: float | None = None
    threads: str = ""


def parse_size(text: str) -> tuple[int, int]:
    """'800x1199' -> (800, 1199) (height x width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like 800x1199 (height x width), got '{text}'") from None
    if h < 32 or w < 32:
        raise ValueError(f"size must be at least 32x32, got '{text}'")
    if max(h, w) > MAX_IMAGE_SIDE:  # a typo must not allocate hundreds of GB
        raise ValueError(f"size must be at most {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}, got '{text}'")
    return h, w


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> tuple[float, float | None]:
    """(median seconds per call, peak GB allocated during the timed calls) after ``warmup`` calls.

    The peak is read over the timed calls only: warm-up includes compilation and cuDNN's algorithm
    search (``cudnn.benchmark`` tries algorithms with workspaces of tens of GB), which a steady-state
    run does not repeat.  None on CPU, where PyTorch keeps no allocator statistics.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak


def random_batch(batch: int, size: tuple[int, int], device: torch.device, num_boxes: int = 7,
                 num_classes: int = 91, seed: int = 0) -> tuple[Tensor, Tensor, list[Target]]:
    """Normalised random images [B, 3, H, W], an all-valid mask and ``num_boxes`` random targets each."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *size, generator=g)
    mask = torch.zeros(batch, *size, dtype=torch.bool)
    targets = []
    for _ in range(batch):
        cxcy = 0.2 + 0.6 * torch.rand(num_boxes, 2, generator=g)
        wh = 0.05 + 0.3 * torch.rand(num_boxes, 2, generator=g)
        targets.append({"labels": torch.randint(0, num_classes, (num_boxes,), generator=g).to(device),
                        "boxes": torch.cat([cxcy, wh], 1).to(device)})
    return images.to(device), mask.to(device), targets


def bench_inference(model: DINO, device: torch.device, size: tuple[int, int], batch: int, modes: Sequence[str],
                    warmup: int, iters: int) -> list[BenchRecord]:
    """Time ``model`` in each inference mode on random images [batch, 3, H, W] (``size`` = (H, W)) with an
    all-False mask [batch, H, W]; one record per mode that ran, the first mode is the baseline."""
    images, mask, _ = random_batch(batch, size, device)
    return _with_speedups(_each(modes, "infer", lambda name: _infer_one(model, name, device, images, mask, warmup,
                                                                       iters)))


def _infer_one(model: DINO, name: str, device: torch.device, images: Tensor, mask: Tensor, warmup: int,
               iters: int) -> BenchRecord:
    # one function per mode: its model copy is freed on return, before the next mode's peak is measured
    start = time.perf_counter()
    runner = ModeRunner(model, name, device)
    runner(images, mask)  # the first call: compilation for the compiled modes
    _sync(device)
    first = time.perf_counter() - start
    sec, peak = _time(lambda: runner(images, mask), device, max(warmup - 1, 0), iters)
    record = _record(name, "infer", sec, images.shape[0], peak, runner.msda_backend)
    record.first_s = round(first, 2)
    record.threads = f"torch intra_op={torch.get_num_threads()}" if device.type == "cpu" else ""
    return record


#: exported-model backends timed by ``bench_exported`` (CPU inference)
EXPORTED = ("onnxruntime", "openvino", "openvino_int8")
CALIB_NOISE_IMAGES = 4


def bench_exported(model: DINO, cfg: DINOConfig, size: tuple[int, int], batch: int, backends: Sequence[str],
                   warmup: int, iters: int, calib_data: str | Path | None = None,
                   calib_images: int = 32) -> list[BenchRecord]:
    """Time ``model`` exported (see the module docstring) and run by each of ``backends`` (``EXPORTED``
    names) on random images [batch, 3, H, W]; a backend that fails is reported and left out."""
    from ..checkpoint import save_checkpoint
    from .export import to_onnx

    images, mask, _ = random_batch(batch, size, torch.device("cpu"))
    orig_sizes = torch.tensor([list(size)] * batch, dtype=torch.int64)
    records: list[BenchRecord] = []
    with tempfile.TemporaryDirectory(prefix="dinodet-bench-") as tmp:
        folder = Path(tmp)
        save_checkpoint(folder / "model.pt", model, cfg)
        for name in backends:
            # OpenVINO gets the graph ``to_openvino`` converts (its MSDA default for fixed shapes; FFNs as
            # 1x1 convolutions for int8), onnxruntime the plain ONNX file
            try:
                start = time.perf_counter()
                log.info("exporting the model to ONNX for %s (minutes; not in the per-image times)", name)
                onnx = to_onnx(folder / "model.pt", folder / f"model_{name}.onnx", input_size=size,
                               batch_size=batch, size=min(size), max_size=max(size),
                               conv_ffn=name == "openvino_int8",
                               target="openvino" if name.startswith("openvino") else "onnx").path
                records.append(_exported_one(name, onnx, folder, time.perf_counter() - start, images, mask,
                                             orig_sizes, warmup, iters, calib_data, calib_images))
            except Exception as e:  # noqa: BLE001 - a missing package, a failed quantisation: one line, the others run
                log.warning(f"infer mode '{name}' failed and is left out: {type(e).__name__}: {first_line(str(e))}")
    return records


def _exported_one(name: str, onnx: Path, folder: Path, export_s: float, images: Tensor, mask: Tensor,
                  orig_sizes: Tensor, warmup: int, iters: int, calib_data: str | Path | None,
                  calib_images: int) -> BenchRecord:
    cpu = torch.device("cpu")
    setup, path = export_s, onnx
    if name == "openvino_int8":
        from .export import quantize_openvino

        calib = calib_data or _noise_images(folder / "calib", images.shape[-2:])
        start = time.perf_counter()
        path = quantize_openvino(onnx, folder / "int8.xml", calib, calib_images).path
        setup += time.perf_counter() - start
    start = time.perf_counter()
    if name == "onnxruntime":
        from ..inference.onnx_runtime import OnnxDetector

        detector: Any = OnnxDetector(path)
    else:
        from ..inference.openvino_runtime import OpenVinoDetector

        detector = OpenVinoDetector(path, cache_dir=None)  # a cold compile: what a first load costs
    detector.run(images, mask, orig_sizes)
    first = time.perf_counter() - start
    sec, _ = _time(lambda: detector.run(images, mask, orig_sizes), cpu, max(warmup - 1, 0), iters)
    record = _record(name, "infer", sec, images.shape[0], None, detector.metadata.get("msda", ""))
    record.first_s, record.setup_s, record.threads = round(first, 2), round(setup, 1), detector.thread_settings
    return record


def _noise_images(folder: Path, hw: Sequence[int]) -> Path:
    """A few uniform-noise JPEGs of size ``hw``: int8 calibration input when the speed is all that counts."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(CALIB_NOISE_IMAGES):
        pixels = rng.integers(0, 256, (int(hw[0]), int(hw[1]), 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"noise_{i}.jpg")
    return folder


def bench_training(cfg: DINOConfig, device: torch.device, size: tuple[int, int], batch: int, modes: Sequence[str],
                   warmup: int, iters: int) -> list[BenchRecord]:
    """Time one training step per mode of ``TRAIN_MODES`` (a fresh model from ``cfg`` each) on random images
    [batch, 3, H, W] with an all-False mask [batch, H, W] and 7 random targets per image; the first mode is
    the baseline."""
    images, mask, targets = random_batch(batch, size, device, num_classes=cfg.model.num_classes)
    return _with_speedups(_each(modes, "train", lambda name: _train_one(cfg, name, device, images, mask, targets,
                                                                       warmup, iters)))


def _each(modes: Sequence[str], task: str, run: Callable[[str], BenchRecord]) -> list[BenchRecord]:
    """``run`` every mode; a fast mode that fails (a kernel that does not build on this GPU, a compiler
    error) is reported in one line and left out of the table.  The baseline (first mode) must run."""
    records = []
    for i, name in enumerate(modes):
        try:
            records.append(run(name))
        except Exception as e:
            if i == 0:
                raise
            first = (str(e).strip().splitlines() or [""])[0][:300]
            log.warning(f"{task} mode '{name}' failed and is left out: {type(e).__name__}: {first}")
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return records


def _train_one(cfg: DINOConfig, name: str, device: torch.device, images: Tensor, mask: Tensor,
               targets: list[Target], warmup: int, iters: int) -> BenchRecord:
    step, msda = make_train_step(cfg, name, device, images, mask, targets)
    sec, peak = _time(step, device, warmup, iters)
    return _record(name, "train", sec, images.shape[0], peak, msda, per_image=False)


def make_train_step(cfg: DINOConfig, name: str, device: torch.device, images: Tensor, mask: Tensor,
                    targets: list[Target]) -> tuple[Callable[[], None], str]:
    """One training step (forward, losses, backward, clipping, AdamW) of a fresh model in training mode
    ``name`` (a key of ``TRAIN_MODES``) on this fixed batch, as a closure, and the MSDA backend it runs."""
    backend, amp, channels_last, fused = TRAIN_MODES[name]
    criterion = build_criterion(cfg.model.num_classes, cfg.loss, cfg.model.dec_layers)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    msda = configure_msda(model, device, compute_dtype(amp), override=backend, needs_grad=True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    # one group (the official step's cost); fused or not is what the modes compare
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused or None)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            out = model(images, mask, targets)
        losses = criterion(out.float(), targets)
        criterion.total_loss(losses).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_max_norm)
        opt.step()

    return step, msda


def _record(mode: str, task: str, sec: float, batch: int, peak: float | None, msda: str,
            per_image: bool = True) -> BenchRecord:
    ms = 1000 * sec / batch if per_image else 1000 * sec
    return BenchRecord(mode, task, round(ms, 2), round(batch / sec, 3), None if peak is None else round(peak, 3),
                       1.0, msda)


def _with_speedups(records: list[BenchRecord]) -> list[BenchRecord]:
    base = records[0].ms
    for r in records:
        r.speedup = round(base / r.ms, 3)
    return records


def run_bench(preset: str = "dino_r50_4scale", device: str = "cpu", size: tuple[int, int] = (800, 1199),
              batch: int = 1, task: str = "infer", modes: Sequence[str] | None = None, train_batch: int | None = None,
              warmup: int = 1, iters: int = 3, calib_data: str | Path | None = None) -> list[BenchRecord]:
    """Benchmark ``preset`` (random weights); the first mode of each task is the baseline (``reference``).
    On the CPU, inference also times the ``EXPORTED`` backends (all of them when ``modes`` is None, else
    those named), measured after the PyTorch modes and compared with the same reference."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # exact float32, as the official timings
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True  # fixed size: let cuDNN pick its convolution algorithms (every mode)
    cfg = get_preset(preset)
    records: list[BenchRecord] = []
    if task in ("infer", "both"):
        names = _ordered(modes or supported_modes(dev), supported_modes(dev))
        exported = [m for m in (EXPORTED if modes is None else modes) if m in EXPORTED] if dev.type == "cpu" else []
        torch.manual_seed(0)
        model = build_model(cfg)
        infer = bench_inference(model, dev, size, batch, names, warmup, iters)
        if exported:
            infer = _with_speedups(infer + bench_exported(model, cfg, size, batch, exported, warmup, iters,
                                                          calib_data))
        records += infer
    if task in ("train", "both"):
        names = _ordered(modes or list(TRAIN_MODES), list(TRAIN_MODES))
        records += bench_training(cfg, dev, size, train_batch or max(batch, 2), names, warmup, iters)
    return records


def _ordered(requested: Sequence[str], known: Sequence[str]) -> list[str]:
    """``reference`` first (the baseline), then the requested modes this task knows, in their order."""
    names = ["reference"] + [m for m in requested if m != "reference" and m in known]
    return list(dict.fromkeys(names))


def format_table(records: Sequence[BenchRecord]) -> str:
    head = (f"{'task':<6} {'mode':<14} {'msda':<14} {'ms':>12} {'img/s':>8} {'peak GB':>8} {'speed-up':>9} "
            f"{'first s':>8} {'setup s':>8}")
    lines = [head, "-" * len(head)]
    for r in records:
        mem = "-" if r.peak_mem_gb is None else f"{r.peak_mem_gb:.2f}"
        unit = "/img" if r.task == "infer" else "/step"
        first = "-" if r.first_s is None else f"{r.first_s:.1f}"
        setup = "-" if r.setup_s is None else f"{r.setup_s:.1f}"
        lines.append(f"{r.task:<6} {r.mode:<14} {r.msda:<14} {r.ms:>8.1f}{unit:<5} {r.img_per_s:>8.2f} {mem:>8} "
                     f"{r.speedup:>8.2f}x {first:>8} {setup:>8}")
    threads = dict.fromkeys(f"{r.mode}: {r.threads}" for r in records if r.threads)
    if threads:
        lines.append("threads: " + "; ".join(threads))
    return "\n".join(lines)


def records_json(records: Sequence[BenchRecord]) -> list[dict]:
    return [asdict(r) for r in records]


def bench_modes(text: str | None, task: str, device: str | torch.device) -> list[str] | None:
    """The modes ``run_bench`` should time, from a comma-separated list (None or empty: every mode
    the device offers).  Checked before the slow model building: a mode that cannot run for any
    of the tasks (``infer``, ``train`` or ``both``) on ``device`` is an error; one that runs for only
    one of both tasks is a logged warning.

    Raises:
        ConfigError: an unknown mode, or one this task cannot time on this device.
    """
    modes = [m.strip() for m in (text or "").split(",") if m.strip()]
    if not modes:
        return None
    unknown = [m for m in modes if m not in MODES and m not in EXPORTED]
    if unknown:
        raise ConfigError(f"unknown mode(s) {', '.join(unknown)} (available: {', '.join([*MODES, *EXPORTED])})")
    cpu = torch.device(device).type == "cpu"
    offered = {"infer": [*supported_modes(device), *(EXPORTED if cpu else ())], "train": list(TRAIN_MODES)}
    tasks = ["infer", "train"] if task == "both" else [task]
    for m in modes:
        fits = [t for t in tasks if m in offered[t]]
        if not fits:
            raise ConfigError(f"mode '{m}' cannot be benchmarked for {task} on {device} "
                              f"(available: {', '.join(dict.fromkeys(x for t in tasks for x in offered[t]))})")
        if len(fits) < len(tasks):
            log.warning(f"mode '{m}' is benchmarked for {fits[0]} only")
    return modes


def check_output_paths(json_out: str | None, plot: str | None) -> None:
    """Before the slow timing: ``--json`` / ``--plot`` name files whose folders can be made."""
    for flag, out in (("--json", json_out), ("--plot", plot)):
        if out and Path(out).is_dir():
            raise ConfigError(f"{flag} '{out}' is a folder; give a file name")
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)


def write_outputs(records: Sequence[BenchRecord], json_out: str | None, plot: str | None,
                  title: str) -> dict[str, Path]:
    """The records as JSON (``json_out``) and as a bar chart (``plot``); returns what was written,
    ``{"records": path, "chart": path}`` (those asked for)."""
    written = {}
    if json_out:
        write_json_atomic(Path(json_out), records_json(records))
        written["records"] = Path(json_out)
    if plot:
        from ..engine.plots import plot_speed  # matplotlib: only when a chart is asked for

        written["chart"] = plot_speed(records_json(records), Path(plot), title)
    return written
