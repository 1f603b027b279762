"""The DINO detector: backbone -> deformable encoder -> query selection -> decoder -> heads."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..boxes import inverse_sigmoid
from ..config import ModelConfig
from ..targets import Target
from .attention import MultiScaleDeformableAttention
from .backbones import build_backbone
from .decoder import DeformableDecoder
from .denoising import ContrastiveDenoising
from .encoder import DeformableEncoder
from .heads import box_head, class_head
from .masks import resample_mask, valid_ratios
from .neck import InputProjection
from .ops.msda import available_backends
from .outputs import DINOOutput
from .position import SinePositionEncoding
from .query_selection import QuerySelection


class DINO(nn.Module):
    """The DINO detector built from a ``ModelConfig``.

    backbone -> projection to ``num_feature_levels`` maps -> deformable encoder -> mixed query selection
    (+ contrastive denoising queries in training) -> deformable decoder with box refinement -> one class
    head and one box head shared by all decoder layers.  Construction rejects an unknown
    ``cfg.msda_backend`` and applies the official initialisation.  The MSDA backend is only requested
    here: ``models.attention.configure_msda`` resolves it where the model is put on a device (until then
    the reference runs, on any device).
    """

    def __init__(self, cfg: ModelConfig, name: str = "custom"):
        super().__init__()
        self.cfg = cfg
        self.preset_name = name  # the preset (or "official ..." architecture) it was built as, for messages
        d = cfg.hidden_dim
        self.backbone = build_backbone(cfg.backbone)
        self.position = SinePositionEncoding(d // 2, cfg.pe_temperature_h, cfg.pe_temperature_w)
        self.input_proj = InputProjection(self.backbone.num_channels, d, cfg.num_feature_levels)
        self.level_embed = nn.Parameter(torch.empty(cfg.num_feature_levels, d))
        self.encoder = DeformableEncoder(cfg.enc_layers, d, cfg.dim_feedforward, cfg.dropout,
                                         cfg.num_feature_levels, cfg.num_heads, cfg.enc_n_points)
        self.query_selection = QuerySelection(d, cfg.num_classes, cfg.num_queries, cfg.proposal_base_size)
        self.denoising = ContrastiveDenoising(cfg.num_classes, cfg.labelbook_size, d, cfg.dn_number,
                                              cfg.dn_label_noise_ratio, cfg.dn_box_noise_scale)
        self.decoder = DeformableDecoder(cfg.dec_layers, d, cfg.dim_feedforward, cfg.dropout,
                                         cfg.num_feature_levels, cfg.num_heads, cfg.dec_n_points)
        # one class head and one box head shared by all decoder layers
        self.class_head = class_head(d, cfg.num_classes)
        self.box_head = box_head(d)
        if cfg.msda_backend not in available_backends():
            raise ValueError(f"unknown model.msda_backend '{cfg.msda_backend}' "
                             f"(available: {', '.join(available_backends())})")
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.msda_backend = cfg.msda_backend
        self._reset_transformer_parameters()

    def _reset_transformer_parameters(self) -> None:
        """Official initialisation: xavier for every matrix of the transformer, then the
        deformable-attention defaults, normal level embeddings."""
        for module in (self.encoder, self.decoder, self.query_selection.memory_proj,
                       self.query_selection.content_queries):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        # the encoder-output heads start as copies of the decoder heads, as officially
        self.query_selection.class_head.load_state_dict(self.class_head.state_dict())
        self.query_selection.box_head.load_state_dict(self.box_head.state_dict())

    def forward(self, images: Tensor, mask: Tensor, targets: list[Target] | None = None, *,
                enc_topk_index: Tensor | None = None) -> DINOOutput:
        """
        Args:
            images: [B, 3, H, W] normalised, zero-padded batch; mask: [B, H, W] True on padding.
            targets: training only, per image 'labels' int64 [n] (class index) and 'boxes' [n, 4]
                cxcywh 0..1; enables the denoising queries when the model is in train mode.
            enc_topk_index: parity-testing hook, see ``QuerySelection.forward``.
        Returns:
            ``DINOOutput`` (L = dec_layers, Q = min(num_queries, S tokens) queries, C = num_classes,
            P = dn pad size; boxes cxcywh in 0..1): logits [L, B, Q, C], boxes [L, B, Q, 4],
            interm_logits [B, Q, C] and interm_boxes [B, Q, 4] (encoder proposals), enc_topk_index [B, Q];
            dn_logits [L, B, P, C], dn_boxes [L, B, P, 4] and dn_meta only when denoising ran, else None.
        """
        feats = self.backbone(images, mask)
        srcs = self.input_proj([f for f, _ in feats])
        masks = [m for _, m in feats]
        for src in srcs[len(masks):]:
            masks.append(resample_mask(mask, src.shape[-2:]))
        spatial_shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]  # ints (symbolic under export)

        pos_flat = torch.cat([
            (self.position(m).to(s.dtype).flatten(1, 2) + self.level_embed[lvl].view(1, 1, -1))
            for lvl, (s, m) in enumerate(zip(srcs, masks))
        ], 1)
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)  # [B, L, 2]

        memory = self.encoder(src_flat, pos_flat, spatial_shapes, ratios, mask_flat)
        sel = self.query_selection(memory, mask_flat, spatial_shapes, enc_topk_index)
        num_queries = sel.content.shape[1]

        content, anchors, attn_mask, dn_meta = sel.content, sel.anchors_unsig, None, None
        if self.training and targets is not None and self.cfg.dn_number > 0:
            dn = self.denoising(targets, num_queries)
            if dn.meta.pad_size > 0:
                content = torch.cat([dn.content, content], 1)
                anchors = torch.cat([dn.anchors_unsig, anchors], 1)
                attn_mask, dn_meta = dn.attn_mask, dn.meta

        hidden, references = self.decoder(content, anchors, memory, mask_flat, spatial_shapes, ratios,
                                          attn_mask, self.box_head)
        # keep the label book in the graph even without targets (DDP needs every parameter used)
        hidden = hidden + 0.0 * self.denoising.label_embed.weight[0, 0]
        boxes = torch.stack([
            (self.box_head(h) + inverse_sigmoid(ref)).sigmoid() for h, ref in zip(hidden, references[:-1])
        ])
        logits = torch.stack([self.class_head(h) for h in hidden])

        dn_logits = dn_boxes = None
        if dn_meta is not None:
            p = dn_meta.pad_size
            dn_logits, dn_boxes = logits[:, :, :p], boxes[:, :, :p]
            logits, boxes = logits[:, :, p:], boxes[:, :, p:]
        return DINOOutput(
            logits=logits, boxes=boxes,
            interm_logits=sel.interm_logits, interm_boxes=sel.interm_boxes,
            enc_topk_index=sel.own_topk_index,
            dn_logits=dn_logits, dn_boxes=dn_boxes, dn_meta=dn_meta,
        )
