"""Typed outputs of the DINO model."""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor


@dataclass
class DenoisingMeta:
    """Layout of the contrastive denoising (CDN) queries placed before the matching queries.

    There are ``num_groups`` groups; each has a positive half and a negative half of
    ``group_size`` slots (= the largest number of targets of an image in the batch).  Slot
    ``g * 2 * group_size + j`` is the positive query of group g for target j, slot
    ``g * 2 * group_size + group_size + j`` its negative counterpart.
    """

    num_groups: int
    group_size: int

    @property
    def pad_size(self) -> int:
        return 2 * self.num_groups * self.group_size


@dataclass
class DINOOutput:
    """Everything the detector predicts for a batch.

    Shapes: L decoder layers, B images, Q matching queries, C classes, P = dn pad size.
    Boxes are (cx, cy, w, h) in 0..1 relative to each image's unpadded size.
    """

    logits: Tensor  # [L, B, Q, C] class logits per decoder layer (last = final prediction)
    boxes: Tensor  # [L, B, Q, 4]
    interm_logits: Tensor  # [B, Q, C] two-stage encoder proposals of the selected tokens
    interm_boxes: Tensor  # [B, Q, 4]
    enc_topk_index: Tensor  # [B, Q] the model's own selection of encoder tokens (rank order)
    dn_logits: Tensor | None = None  # [L, B, P, C] denoising queries (training only)
    dn_boxes: Tensor | None = None  # [L, B, P, 4]
    dn_meta: DenoisingMeta | None = None

    @property
    def pred_logits(self) -> Tensor:
        """[B, Q, C] final-layer class logits."""
        return self.logits[-1]

    @property
    def pred_boxes(self) -> Tensor:
        """[B, Q, 4] final-layer boxes, cxcywh in 0..1."""
        return self.boxes[-1]

    def first_images(self, n: int) -> DINOOutput:
        """The predictions of the batch's first ``n`` images (views; for dropping batch padding)."""
        def f(t: Tensor | None, dim: int) -> Tensor | None:
            return None if t is None else t.narrow(dim, 0, n)

        return replace(self, logits=f(self.logits, 1), boxes=f(self.boxes, 1), interm_logits=f(self.interm_logits, 0),
                       interm_boxes=f(self.interm_boxes, 0), enc_topk_index=f(self.enc_topk_index, 0),
                       dn_logits=f(self.dn_logits, 1), dn_boxes=f(self.dn_boxes, 1))

    def float(self) -> DINOOutput:
        """The same output in float32 (losses are computed in float32 even when the model ran under autocast)."""
        def f(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.float()

        return replace(self, logits=f(self.logits), boxes=f(self.boxes), interm_logits=f(self.interm_logits),
                       interm_boxes=f(self.interm_boxes), dn_logits=f(self.dn_logits), dn_boxes=f(self.dn_boxes))
