"""Swin Transformer backbone (Swin-T/S/B/L, patch 4, window 7 or 12) as DINO uses it.

This is dinodet's own module rather than ``timm.models.SwinTransformer``: DINO's Swin (inherited from
the Swin detection code) behaves differently from timm's for the arbitrary, non-square image sizes a
detector sees, and the difference is numerical, not cosmetic:

* Window padding order.  Each block here zero-pads the (normalised) feature map at the bottom/right
  to a multiple of the window size FIRST and then applies the cyclic shift, so after the shift the
  padded zero tokens sit inside the windows and take part in attention (they are not masked; only the
  shifted-window region mask applies).  timm (1.0.x, ``dynamic_mask``) rolls the unpadded map first
  and pads afterwards, which puts different tokens into different windows whenever H or W is not a
  multiple of the window size -> different features.
* Window size.  DINO always uses the configured window (7 or 12) and pads small maps up to it; timm
  shrinks the window to the feature-map size (and drops the shift) when the map is smaller, unless
  ``always_partition`` is set, and its padding still follows the order above.
* Stage layout and outputs.  DINO normalises each returned stage with its own LayerNorm ``norm{i}``
  applied BEFORE that stage's patch merging; timm's stages put the patch merging at the start of the
  next stage and only have one final norm.  ``relative_position_index`` is a persistent buffer in the
  official state dict (timm's is non-persistent).
* Patch embedding pads the image to a multiple of the patch size (bottom/right) instead of
  requiring a fixed ``img_size``.

Parameter names follow the original Swin / DINO layout (``patch_embed``, ``layers.{i}.blocks.{j}``,
``layers.{i}.downsample``, ``norm{i}``), so original ImageNet checkpoints load by name and official
DINO keys are ``backbone.0.<name>``.  Stochastic depth uses ``timm.layers.DropPath`` (one per block,
also at rate 0, so its ``drop_prob`` can be overridden at run time).  Absolute position embeddings
(``ape``), which DINO never enables, are not implemented.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .staged import StagedBackbone

# embed_dim, depths, heads (patch size 4 everywhere; window size is a separate knob: 7 or 12)
SWIN_VARIANTS: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    "swin_t": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "swin_s": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "swin_b": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "swin_l": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}


def window_partition(x: Tensor, ws: int) -> Tensor:
    """[B, H, W, C] (H, W multiples of ws) -> [B * nW, ws * ws, C], windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_merge(windows: Tensor, ws: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`window_partition`: [B * nW, ws * ws, C] -> [B, H, W, C]."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // ws) * (w // ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def relative_position_index(ws: int) -> Tensor:
    """[ws*ws, ws*ws] index into the (2ws-1)^2 bias table: (dy + ws-1) * (2ws-1) + (dx + ws-1)."""
    ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + ws - 1
    dx = xs[:, None] - xs[None, :] + ws - 1
    return dy * (2 * ws - 1) + dx


def shifted_window_mask(hp: int, wp: int, ws: int, shift: int, dtype: torch.dtype, device) -> Tensor:
    """Additive mask [nW, ws*ws, ws*ws] for shifted windows of a padded (hp, wp) map: tokens from
    different regions of the rolled map get -100 (as in the original Swin), others 0."""
    region = torch.zeros(hp, wp, dtype=dtype, device=device)
    bounds = ((0, hp - ws), (hp - ws, hp - shift), (hp - shift, hp))
    wbounds = ((0, wp - ws), (wp - ws, wp - shift), (wp - shift, wp))
    label = 0
    for y0, y1 in bounds:
        for x0, x1 in wbounds:
            region[y0:y1, x0:x1] = label
            label += 1
    windows = window_partition(region[None, :, :, None], ws).squeeze(-1)  # [nW, ws*ws]
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x [B*nW, N, C]; mask [nW, N, N] additive or None."""
        bw, n, c = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(bw, n, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, h)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(bw // nw, nw, h, n, n) + mask[None, :, None]).view(bw, h, n, n)
        attn = attn.softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """(Shifted-)window attention + MLP, pre-norm, with stochastic depth on both residual branches."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: int, drop_path: float, mlp_ratio: float = 4.0):
        super().__init__()
        self.window_size, self.shift = window_size, shift
        from timm.layers import DropPath  # imported on use: timm is only needed by Swin / ConvNeXt

        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, h: int, w: int, shift_mask: Tensor | None) -> Tensor:
        """x [B, h*w, C] -> same shape."""
        b, _, c = x.shape
        ws, s = self.window_size, self.shift
        y = self.norm1(x).view(b, h, w, c)
        # pad first (zeros at the bottom/right), THEN roll: padded tokens join the shifted windows
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if s > 0:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = self.attn(window_partition(y, ws), shift_mask if s > 0 else None)
        y = window_merge(y, ws, hp, wp)
        if s > 0:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        y = y[:, :h, :w, :].reshape(b, h * w, c)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token: concat (even row, even col), (odd, even), (even, odd), (odd, odd),
    LayerNorm, linear 4C -> 2C.  Odd sizes are zero-padded at the bottom/right."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        """x [B, h*w, C] (row-major tokens of an h x w map) -> [B, ceil(h/2) * ceil(w/2), 2C]."""
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """``depth`` blocks alternating plain / shifted windows, optionally followed by patch merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, drop_path: list[float], downsample: bool):
        super().__init__()
        self.window_size = window_size
        self.shift = window_size // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else self.shift, drop_path[i]) for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None
        self.use_checkpoint = False

    def forward(self, x: Tensor, h: int, w: int) -> tuple[Tensor, Tensor, int, int]:
        """-> (stage output [B, h*w, C], next-stage input, its h, its w)."""
        ws = self.window_size
        hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
        mask = shifted_window_mask(hp, wp, ws, self.shift, x.dtype, x.device) if len(self.blocks) > 1 else None
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, h, w, mask, use_reentrant=False)
            else:
                x = blk(x, h, w, mask)
        if self.downsample is None:
            return x, x, h, w
        return x, self.downsample(x, h, w), (h + 1) // 2, (w + 1) // 2


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch conv + LayerNorm; the image is zero-padded to a multiple of ``patch``."""

    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, 3, H, W] -> [B, dim, ceil(H / patch), ceil(W / patch)] (LayerNorm over the channels)."""
        p = self.patch
        h, w = x.shape[-2:]
        if h % p or w % p:
            x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        x = self.proj(x)
        b, c, hh, ww = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).view(b, c, hh, ww)


class SwinTransformer(nn.Module):
    """The trunk: patch embedding, four stages, one LayerNorm ``norm{i}`` per returned stage.

    ``dilation`` (as the official option) drops the patch merging after stage 2, so stage 3 runs at
    stride 16 with half the usual width.
    """

    def __init__(self, embed_dim: int, depths: tuple[int, ...], num_heads: tuple[int, ...], window_size: int = 7,
                 drop_path_rate: float = 0.2, out_indices: tuple[int, ...] = (1, 2, 3), dilation: bool = False,
                 patch_size: int = 4):
        super().__init__()
        n = len(depths)
        self.out_indices = tuple(out_indices)
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        dims = [embed_dim * 2 ** i for i in range(n)]
        downsample = [i < n - 1 for i in range(n)]
        if dilation:
            downsample[n - 2] = False
            dims[n - 1] = dims[n - 2]
        self.num_features = dims
        self.layers = nn.ModuleList(
            SwinStage(dims[i], depths[i], num_heads[i], window_size, dpr[sum(depths[:i]):sum(depths[:i + 1])], downsample[i])
            for i in range(n)
        )
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))
        self.apply(_init_weights)

    def forward(self, images: Tensor) -> list[Tensor]:
        """images [B, 3, H, W] -> per stage i in ``out_indices`` (in stage order) a normalised map
        [B, num_features[i], ceil(H / 2^(i+2)), ceil(W / 2^(i+2))] (with ``dilation``, stage 3 keeps stage 2's size)."""
        x = self.patch_embed(images)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        outs = []
        last = max(self.out_indices)
        for i, stage in enumerate(self.layers):
            out, x, nh, nw = stage(x, h, w)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
                outs.append(out.view(-1, h, w, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
            if i == last:
                break
            h, w = nh, nw
        return outs


def _init_weights(m: nn.Module) -> None:
    """Original Swin initialisation (trunc-normal 0.02 linears, unit LayerNorms)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class SwinBackbone(StagedBackbone):
    """Swin trunk behind the backbone interface: ``forward(images, mask) -> [(features, mask), ...]``.

    ``return_layers`` count stages like the official ``return_interm_indices`` (0..3 = strides 4..32).
    ``frozen_stages`` (see ``StagedBackbone``): a stage includes the patch merging that ends it; the
    official ``_freeze_stages`` numbering is shifted by one (its ``frozen_stages=k+1`` freezes what
    ``k`` freezes here; DINO itself never freezes Swin), and frozen parts have no stochastic depth.
    ``use_checkpoint`` recomputes every block's activations in the backward pass
    (torch.utils.checkpoint) instead of storing them.
    """

    def __init__(self, name: str = "swin_l", return_layers: tuple[int, ...] = (1, 2, 3), window_size: int = 7,
                 drop_path_rate: float = 0.2, use_checkpoint: bool = False, frozen_stages: int = -1,
                 dilation: bool = False):
        super().__init__()
        if name not in SWIN_VARIANTS:
            raise ValueError(f"unknown Swin variant '{name}' (available: {', '.join(SWIN_VARIANTS)})")
        embed_dim, depths, heads = SWIN_VARIANTS[name]
        self._setup(return_layers, len(depths), frozen_stages)
        self.body = SwinTransformer(embed_dim, depths, heads, window_size, drop_path_rate, self.return_layers, dilation)
        self.num_channels = [self.body.num_features[i] for i in self.return_layers]
        self.strides = [min(2 ** (i + 2), 16) if dilation else 2 ** (i + 2) for i in self.return_layers]
        self.set_checkpointing(use_checkpoint)
        for m in self.frozen_modules():
            m.requires_grad_(False)

    @property
    def stem(self) -> nn.Module:
        return self.body.patch_embed

    @property
    def stages(self) -> list[nn.Module]:
        return list(self.body.layers)

    def features(self, images: Tensor) -> list[Tensor]:
        return self.body(images)

    def set_checkpointing(self, enabled: bool = True) -> None:
        for stage in self.body.layers:
            stage.use_checkpoint = enabled
