"""Run dinodet the way the parity contract (``shared/reference/check_parity.py``) prescribes.

    python -m dinodet.compat.reference_run --checkpoint W.pth --preset PRESET --inputs IN.pt --out OUT.pt

Loads an official-format checkpoint, runs (a) an eval forward + post-processing and (b) a train
forward with zero denoising noise, the official criterion and a backward pass, and writes the
outputs, losses and gradients of the requested official parameters.

By default the computation runs in float64 and the results are cast back to float32.  The
contract's tolerances are 25x the official model's own float32 noise, measured against a float64
run; a float64 evaluation of the same model is therefore the reference point that every fixture
admits, while a float32 run can land on the other side of a discrete rounding event (e.g. a ReLU in
the backbone whose input is within float32 noise of zero flips its gradient).  ``--dtype float32``
runs the plain float32 path.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from ..checkpoint import CheckpointError, load_checkpoint
from ..config import ConfigError
from ..data.transforms import pad_batch
from ..models.criterion import build_criterion
from ..models.dino import DINO
from ..models.postprocess import postprocess
from .official_keys import official_key_map


def apply_train_overrides(model: DINO, overrides: dict[str, Any]) -> None:
    """Set the noise knobs the contract switches off for the train-mode pass."""
    for key, value in overrides.items():
        if key == "dn_label_noise_ratio":
            model.denoising.label_noise_ratio = float(value)
        elif key == "dn_box_noise_scale":
            model.denoising.box_noise_scale = float(value)
        elif key == "drop_path_rate":
            for m in model.modules():  # stochastic depth only exists in transformer backbones
                if hasattr(m, "drop_prob"):
                    m.drop_prob = float(value)
        else:
            raise ConfigError(f"unknown train override '{key}'")


def run(checkpoint: str, preset: str, inputs: dict[str, Any], dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    loaded = load_checkpoint(checkpoint, preset=preset)
    model, cfg = loaded.model.to(dtype), loaded.config
    images, mask = pad_batch([im.to(dtype) for im in inputs["images"]])
    topk = inputs.get("enc_topk_index")

    model.eval()
    with torch.no_grad():
        out = model(images, mask, enc_topk_index=topk)
        dets = postprocess(out.pred_logits, out.pred_boxes, inputs["orig_sizes"], int(inputs["num_select"]))
    result_eval = {
        "pred_logits": out.pred_logits, "pred_boxes": out.pred_boxes,
        "aux_logits": out.logits[:-1], "aux_boxes": out.boxes[:-1],
        "enc_topk_index": out.enc_topk_index,
        "interm_logits": out.interm_logits, "interm_boxes": out.interm_boxes,
        "scores": dets.scores, "labels": dets.labels, "boxes": dets.boxes,
    }

    model.train()
    apply_train_overrides(model, inputs.get("train_overrides", {}))
    targets = [{"labels": t["labels"].long(), "boxes": t["boxes"].to(dtype)} for t in inputs["targets"]]
    criterion = build_criterion(cfg.model.num_classes, cfg.loss, cfg.model.dec_layers)
    criterion.train()
    model.zero_grad(set_to_none=True)
    out = model(images, mask, targets, enc_topk_index=topk)
    losses = criterion(out, targets)
    total = criterion.total_loss(losses)
    total.backward()

    key_map = official_key_map(list(model.state_dict()), cfg.model.dec_layers, len(cfg.model.backbone.return_layers))
    params = dict(model.named_parameters())
    grads = {}
    for key in inputs.get("grad_keys", []):
        p = params[key_map[key]]
        grads[key] = (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float()

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.detach().cpu().float() if t.is_floating_point() else t.detach().cpu()

    return {
        "eval": {k: f32(v) for k, v in result_eval.items()},
        "train": {
            "losses": {k: v.detach().float().cpu().reshape(()) for k, v in losses.items()},
            "loss_total": total.detach().float().cpu(),
            "grads": grads,
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dinodet.compat.reference_run", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                    help="compute precision (outputs are float32 either way)")
    a = ap.parse_args(argv)
    try:
        inputs = torch.load(a.inputs, map_location="cpu", weights_only=True)
        result = run(a.checkpoint, a.preset, inputs, getattr(torch, a.dtype))
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"dinodet: error: {e}", file=sys.stderr)
        return 2
    torch.save(result, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
