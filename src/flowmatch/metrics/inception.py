"""Inception-v3 pool features as pytorch-fid computes them, from a local weights file.

The network is the TensorFlow 2015-12-05 Inception-v3 that FID is defined with, in the PyTorch
layout of pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``, 1008 logits). It differs from the
ImageNet Inception-v3 in three places: the 3x3 average pools of the ``Mixed_5*``, ``Mixed_6b-e``
and ``Mixed_7b`` blocks ignore the zero padding (``count_include_pad=False``), and ``Mixed_7c``
pools its fourth branch with a max instead of an average. Nothing is downloaded: the user passes
the file, which ``load_inception`` accepts only if its sha256 is the published one.

Inputs as pytorch-fid: pytorch-fid takes ``p`` in ``[0, 1]`` (``v / 255`` for 8-bit pixels),
resizes to 299x299 bilinearly (``align_corners=False``, no antialiasing) and feeds ``2 p - 1``.
A model-space image ``x`` in ``[-1, 1]`` is that ``2 p - 1`` already, i.e. ``p = (x + 1) / 2``;
resizing before or after the affine map is the same, since bilinear weights sum to one. uint8
pixels ``v`` with ``L`` levels give ``x = 2 v / (L - 1) - 1``, pytorch-fid's exact input for
8-bit files. Model-space images at cell centres, ``x = 2 (v + 1/2) / 256 - 1``, differ from it
by ``|dp| = |127.5 - v| / (255 * 256) <= 1/512``, half an 8-bit step; pass uint8 pixels for
pytorch-fid's input exactly. Grey images are repeated to three channels.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    + INCEPTION_WEIGHTS_FILE
)
INCEPTION_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (``eps = 1e-3``, TensorFlow's), ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: Tensor) -> Tensor:
    """Stride-1 3x3 average over the in-image neighbours only, as TensorFlow's average pool."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool_3x3(x: Tensor) -> Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _row(in_channels: int, out_channels: int) -> BasicConv2d:
    """A 1x3 convolution (one row), padded to keep the size."""
    return BasicConv2d(in_channels, out_channels, (1, 3), padding=(0, 1))


def _column(in_channels: int, out_channels: int) -> BasicConv2d:
    """A 3x1 convolution (one column), padded to keep the size."""
    return BasicConv2d(in_channels, out_channels, (3, 1), padding=(1, 0))


class InceptionA(nn.Module):
    """35x35 block: ``[1x1 | 1x1, 5x5 | 1x1, 3x3, 3x3 | pool, 1x1]`` with
    ``64 + 64 + 96 + pool_features`` output channels."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        wide = self.branch5x5_2(self.branch5x5_1(x))
        deep = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pooled = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([self.branch1x1(x), wide, deep, pooled], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17: ``[3x3/2 | 1x1, 3x3, 3x3/2 | maxpool/2]`` with
    ``384 + 96 + in_channels`` output channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        deep = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pooled = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), deep, pooled], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (``c = channels_7x7``):
    ``[1x1 | 1x1, 1x7, 7x1 | 1x1, 7x1, 1x7, 7x1, 1x7 | pool, 1x1]``, 4 x 192 output channels."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c, 1)
        self.branch7x7_2 = BasicConv2d(c, c, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c, 1)
        self.branch7x7dbl_2 = BasicConv2d(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c, c, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        wide = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        deep = x
        for conv in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            deep = conv(deep)
        pooled = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([self.branch1x1(x), wide, deep, pooled], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8: ``[1x1, 3x3/2 | 1x1, 1x7, 7x1, 3x3/2 | maxpool/2]`` with
    ``320 + 192 + in_channels`` output channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        narrow = self.branch3x3_2(self.branch3x3_1(x))
        deep = self.branch7x7x3_1(x)
        deep = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(deep)))
        pooled = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([narrow, deep, pooled], dim=1)


class InceptionE(nn.Module):
    """8x8 block with split 3x3 convolutions:
    ``[1x1 | 1x1, (1x3 ; 3x1) | 1x1, 3x3, (1x3 ; 3x1) | pool, 1x1]``, ``320 + 768 + 768 + 192``
    output channels. ``max_pool`` selects pytorch-fid's ``Mixed_7c`` (max instead of average)."""

    def __init__(self, in_channels: int, max_pool: bool = False) -> None:
        super().__init__()
        self.pool = _max_pool_3x3 if max_pool else _avg_pool_3x3
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = _row(384, 384)
        self.branch3x3_2b = _column(384, 384)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _row(384, 384)
        self.branch3x3dbl_3b = _column(384, 384)
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        wide = self.branch3x3_1(x)
        deep = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(wide),
                self.branch3x3_2b(wide),
                self.branch3x3dbl_3a(deep),
                self.branch3x3dbl_3b(deep),
                self.branch_pool(self.pool(x)),
            ],
            dim=1,
        )


class InceptionV3(nn.Module):
    """pytorch-fid's Inception-v3: ``forward`` maps images ``[B, 1 or 3, H, W]`` in ``[-1, 1]``
    to the 2048 averaged ``Mixed_7c`` activations (the FID features); ``fc`` gives the 1008
    logits. Module names and shapes are those of ``pt_inception-2015-12-05-6726825d.pth``.
    """

    name = "inception-v3-pytorch-fid"

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)

    def forward(self, x: Tensor) -> Tensor:
        """Features ``[B, 2048]``: grey repeated to RGB, bilinear resize to 299x299, then
        299 -> 35 (stem) -> 17 (``Mixed_6a``) -> 8 (``Mixed_7a``) -> global average."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return x.mean(dim=(2, 3))

    def classify(self, x: Tensor) -> Tensor:
        """The 1008 logits of the TensorFlow graph (ImageNet classes plus 8 unused)."""
        return self.fc(self(x))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def load_inception(path: str | Path) -> InceptionV3:
    """pytorch-fid's Inception-v3 from ``path``, in eval mode without gradients, on the CPU.

    ``path`` must be ``pt_inception-2015-12-05-6726825d.pth`` (from ``INCEPTION_WEIGHTS_URL``),
    recognised by its sha256 whatever its name; any other file raises ``ValueError``. The
    state dict is read with ``weights_only=True``, so no code is unpickled.
    """
    digest = file_sha256(path)
    if digest != INCEPTION_WEIGHTS_SHA256:
        raise ValueError(
            f"{path} is not pytorch-fid's Inception-v3 weights: expected {INCEPTION_WEIGHTS_FILE} "
            f"(sha256 {INCEPTION_WEIGHTS_SHA256[:8]}...), got sha256 {digest[:8]}..."
        )
    model = InceptionV3()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


def inception_features(
    model: InceptionV3, images: Tensor, batch_size: int = 64, levels: int = 256
) -> Tensor:
    """Features ``[N, 2048]`` (float64) of ``images: [N, 1 or 3, H, W]``.

    Float images are in model space ``[-1, 1]``; uint8 pixels ``v`` with ``levels`` levels are
    mapped to ``2 v / (levels - 1) - 1`` (pytorch-fid's ``2 * v / 255 - 1`` for 8-bit).
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape [N, 1 or 3, H, W], got {list(images.shape)}")
    parameter = next(model.parameters())
    chunks = []
    with torch.inference_mode():
        for batch in images.split(batch_size):
            batch = batch.to(parameter.device)
            if batch.dtype == torch.uint8:
                batch = batch.to(parameter.dtype) * (2.0 / (levels - 1)) - 1.0
            chunks.append(model(batch.to(parameter.dtype)).double())
    return torch.cat(chunks)
