"""ADM-style U-Net (Dhariwal & Nichol 2021) for images: a velocity network ``v(x, t)``.

``x: [B, C, H, W]`` with ``H = W = image_size`` divisible by ``2^(len(channel_mult) - 1)``.
Residual blocks take the time (and label, and context) embedding through scale-shift GroupNorm,
``h = GroupNorm(h) * (1 + scale) + shift``; self-attention runs at the listed image
resolutions and in the middle block; skip connections join the down and up paths; the last
convolution of every residual branch and of the output is zero-initialised, as in ADM.
The embedding is ``Linear(silu(Linear([emb(t_1), ..., emb(t_k)])))`` over the sinusoidal features
of the ``num_times`` time inputs: the first linear map adds their projections (``k = 2`` for a
flow map, fed ``s`` and ``t - s``).

Forward-mode AD (``torch.func.jvp``) is not implemented for the fused attention kernels of
``F.scaled_dot_product_attention``; set ``unet.jvp_safe_attention = True`` to run attention on the
math kernel, which supports it (``FlowMapNet`` does this for its backbone).

Presets (constructor kwargs): ``unet_cifar10_paper()`` (Flow Matching paper, Table 3; 153.1M
parameters), ``unet_mnist()`` (28x28; 1.19M) and ``unet_digits()`` (8x8 scikit-learn digits; 0.76M).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from flowmatch.nets.embeddings import (
    ContextEmbedding,
    LabelEmbedding,
    SinusoidalTimeEmbedding,
    context_embedding,
    time_input,
)


def _zero(module: nn.Module) -> nn.Module:
    """Zero the parameters of ``module``: a residual branch then starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """``x -> skip(x) + conv(dropout(silu(GroupNorm(conv(silu(GroupNorm(x)))) * (1 + a) + b)))``.

    ``(a, b) = Linear(silu(emb))`` is the per-channel scale and shift from the embedding.
    """

    def __init__(
        self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, num_groups: int
    ) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(num_groups, in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.out_norm = nn.GroupNorm(num_groups, out_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(),
            nn.Dropout(dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Self-attention over the ``H * W`` positions: ``x + proj(attention(GroupNorm(x)))``.

    ``jvp_safe = True`` forces the math kernel of scaled-dot-product attention (forward-mode AD).
    """

    def __init__(self, channels: int, num_heads: int, num_groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = _zero(nn.Linear(channels, channels))
        self.jvp_safe = False

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        qkv = self.qkv(h).unflatten(-1, (3, self.num_heads, c // self.num_heads))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, HW, C / heads]
        if self.jvp_safe:
            with sdpa_kernel(SDPBackend.MATH):
                h = F.scaled_dot_product_attention(q, k, v)
        else:
            h = F.scaled_dot_product_attention(q, k, v)
        h = self.proj(h.transpose(1, 2).flatten(2))  # [B, HW, C]
        return x + h.transpose(1, 2).reshape(b, c, height, width)


class Downsample(nn.Conv2d):
    """Strided 3x3 convolution: ``[B, C, H, W] -> [B, C, H / 2, W / 2]``."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, stride=2, padding=1)


class Upsample(nn.Module):
    """Nearest-neighbour doubling then a 3x3 convolution: ``[B, C, H, W] -> [B, C, 2H, 2W]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """A sequence of layers that passes the embedding to the residual blocks only."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """``v(x, *times, y=None) -> [B, out_channels, H, W]`` for ``x: [B, in_channels, H, W]``.

    Args:
        in_channels: image channels.
        model_channels: base width; level ``i`` has ``channel_mult[i] * model_channels``.
        channel_mult: width multipliers, one per resolution level.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: image resolutions (e.g. ``(16,)``) with attention after each block.
        num_heads: attention heads, used when ``num_head_channels`` is None.
        num_head_channels: channels per head; when given it fixes the head count per level
            (ADM's convention, so ``num_heads`` is then ignored).
        dropout: dropout rate inside the residual blocks.
        num_classes: enables class conditioning ``y: LongTensor [B]`` in ``0..num_classes``,
            index ``num_classes`` being the null label.
        image_size: height and width of the input.
        out_channels: defaults to ``in_channels``.
        num_groups: GroupNorm groups; must divide ``model_channels``.
        num_times: number of time inputs (1 for a velocity field, 2 for a flow map).
        time_scale: ``scale`` of the sinusoidal embedding (``t`` in [0, 1]).
        jvp_safe_attention: run attention on the math kernel (needed by ``torch.func.jvp``).
        context_dim: enables context conditioning ``context: [B, context_dim]`` (rows of NaN:
            no context): a small MLP of the context added to the time embedding.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_heads: int = 4,
        num_head_channels: int | None = None,
        dropout: float = 0.0,
        num_classes: int | None = None,
        image_size: int = 32,
        out_channels: int | None = None,
        num_groups: int = 32,
        num_times: int = 1,
        time_scale: float = 1000.0,
        jvp_safe_attention: bool = False,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        levels = len(channel_mult)
        if image_size % 2 ** (levels - 1):
            raise ValueError(
                f"image_size {image_size} must be divisible by 2^(len(channel_mult) - 1) = "
                f"{2 ** (levels - 1)}"
            )
        resolutions = [image_size // 2**level for level in range(levels)]
        unknown = sorted(set(attention_resolutions) - set(resolutions))
        if unknown:
            raise ValueError(
                f"attention_resolutions {unknown} are not among the resolutions {resolutions}"
            )
        if model_channels % num_groups:
            raise ValueError(f"num_groups {num_groups} must divide model_channels {model_channels}")
        out_channels = in_channels if out_channels is None else out_channels
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "model_channels": model_channels,
            "channel_mult": list(channel_mult),
            "num_res_blocks": num_res_blocks,
            "attention_resolutions": list(attention_resolutions),
            "num_heads": num_heads,
            "num_head_channels": num_head_channels,
            "dropout": dropout,
            "num_classes": num_classes,
            "image_size": image_size,
            "out_channels": out_channels,
            "num_groups": num_groups,
            "num_times": num_times,
            "time_scale": time_scale,
            "context_dim": context_dim,
        }
        self.num_times = num_times
        self.null_label = num_classes

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            SinusoidalTimeEmbedding(model_channels, scale=time_scale),
            nn.Linear(num_times * model_channels, emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
        )
        self.label_embed = LabelEmbedding(num_classes, emb_dim) if num_classes is not None else None
        self.context_embed = ContextEmbedding(context_dim, emb_dim) if context_dim else None

        def res_block(in_ch: int, out_ch: int) -> ResBlock:
            return ResBlock(in_ch, out_ch, emb_dim, dropout, num_groups)

        def attention(ch: int) -> AttentionBlock:
            if num_head_channels is not None:
                if ch % num_head_channels:
                    raise ValueError(f"num_head_channels {num_head_channels} must divide {ch}")
                return AttentionBlock(ch, ch // num_head_channels, num_groups)
            if ch % num_heads:
                raise ValueError(f"num_heads {num_heads} must divide {ch}")
            return AttentionBlock(ch, num_heads, num_groups)

        ch = model_channels
        self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
        skip_channels = [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if resolutions[level] in attention_resolutions:
                    layers.append(attention(ch))
                self.down.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                self.down.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle = EmbedSequential(res_block(ch, ch), attention(ch), res_block(ch, ch))

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if resolutions[level] in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.up.append(EmbedSequential(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(num_groups, ch),
            nn.SiLU(),
            _zero(nn.Conv2d(ch, out_channels, 3, padding=1)),
        )
        self.jvp_safe_attention = jvp_safe_attention

    @property
    def jvp_safe_attention(self) -> bool:
        """Whether attention runs on the math kernel, which supports ``torch.func.jvp``."""
        return self._jvp_safe_attention

    @jvp_safe_attention.setter
    def jvp_safe_attention(self, value: bool) -> None:
        self._jvp_safe_attention = value
        for module in self.modules():
            if isinstance(module, AttentionBlock):
                module.jvp_safe = value

    def forward(
        self,
        x: Tensor,
        *times: Tensor,
        t: Tensor | float | None = None,
        y: Tensor | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """``v(x, *times)``, or ``v(x=x, t=t)`` by keyword; a scalar ``t`` holds for the batch."""
        emb = self.time_embed(time_input(x, times, t, self.num_times))
        if self.label_embed is not None:
            if y is None:
                raise ValueError(f"class-conditional model: pass y (null label {self.null_label})")
            emb = emb + self.label_embed(y)
        emb = emb + context_embedding(self.context_embed, context)
        # Channels-last input would carry its layout to GroupNorm, whose forward-mode derivative
        # (torch.func.jvp of the flow-map objectives) needs contiguous activations.
        h = self.input_conv(x.contiguous())
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def unet_cifar10_paper() -> dict[str, Any]:
    """``UNet`` kwargs of the Flow Matching paper's CIFAR-10 network (Lipman et al. 2022, Table 3).

    256 channels, 2 residual blocks per level, multipliers (1, 2, 2, 2), attention at 16x16 with
    64-channel heads (the paper lists "heads 4 / head channels 64", ADM's flags, under which the
    head width wins), dropout 0: 153.1M parameters (unconditional).
    """
    return {
        "in_channels": 3,
        "model_channels": 256,
        "channel_mult": [1, 2, 2, 2],
        "num_res_blocks": 2,
        "attention_resolutions": [16],
        "num_heads": 4,
        "num_head_channels": 64,
        "dropout": 0.0,
        "image_size": 32,
    }


def unet_mnist() -> dict[str, Any]:
    """``UNet`` kwargs for 28x28 grey images (28 -> 14 -> 7), 1.19M parameters."""
    return {
        "in_channels": 1,
        "model_channels": 32,
        "channel_mult": [1, 2, 2],
        "num_res_blocks": 1,
        "attention_resolutions": [7],
        "num_heads": 4,
        "dropout": 0.0,
        "image_size": 28,
        "num_groups": 8,
    }


def unet_digits() -> dict[str, Any]:
    """``UNet`` kwargs for 8x8 grey images (scikit-learn digits; 8 -> 4): 0.76M parameters."""
    return {
        "in_channels": 1,
        "model_channels": 32,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "attention_resolutions": [4],
        "num_heads": 4,
        "dropout": 0.0,
        "image_size": 8,
        "num_groups": 8,
    }
