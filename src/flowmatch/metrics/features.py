"""Image features from small LeNet-style classifiers shipped with the package.

No Inception-v3 weights can be obtained offline, so Frechet distance, KID and precision/recall
on digits, MNIST and Fashion-MNIST use the penultimate activations (after ReLU) of a classifier
trained on that set's training split by ``scripts/train_feature_classifier.py``. The weights live
in ``flowmatch/assets/lenet-{name}.safetensors`` with a JSON sidecar (architecture, test
accuracy, seed, epochs, the command). Numbers computed with them carry the extractor's name
(``lenet-mnist``, ...) and are not comparable with published Inception-based FID values.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from flowmatch.data.images import to_model_space

FEATURE_EXTRACTORS = ("digits", "mnist", "fashion-mnist")
ASSETS = Path(__file__).resolve().parents[1] / "assets"


@dataclass(frozen=True)
class LeNetConfig:
    """Architecture and input format of a feature classifier.

    Inputs are ``[B, in_channels, image_size, image_size]`` in model space ``[-1, 1]``; uint8
    images with ``levels`` levels are mapped to their cell centres first.
    """

    name: str
    levels: int
    in_channels: int = 1
    image_size: int = 28
    channels: tuple[int, ...] = (16, 32, 32)
    feature_dim: int = 128
    num_classes: int = 10


class LeNet(nn.Module):
    """One block of (3x3 conv, ReLU, 2x2 max-pool) per entry of ``channels``, then a ReLU linear
    layer of ``feature_dim`` units (the features) and a linear classification head.
    """

    def __init__(self, config: LeNetConfig) -> None:
        super().__init__()
        self.config = config
        blocks: list[nn.Module] = []
        width = config.in_channels
        for channels in config.channels:
            blocks += [nn.Conv2d(width, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            width = channels
        side = config.image_size // 2 ** len(config.channels)
        if side < 1:
            raise ValueError(
                f"image_size {config.image_size} is too small for {len(config.channels)} poolings"
            )
        self.convs = nn.Sequential(*blocks)
        self.features = nn.Sequential(
            nn.Flatten(), nn.Linear(width * side * side, config.feature_dim), nn.ReLU()
        )
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    @property
    def name(self) -> str:
        """The label that metrics computed with these features carry, e.g. ``lenet-mnist``."""
        return f"lenet-{self.config.name}"

    def forward(self, x: Tensor) -> Tensor:
        """Features ``[B, feature_dim]`` of images ``x: [B, C, H, W]`` in ``[-1, 1]``."""
        return self.features(self.convs(x))

    def classify(self, x: Tensor) -> Tensor:
        """Class logits ``[B, num_classes]``."""
        return self.head(self(x))


def save_feature_extractor(model: LeNet, directory: str | Path, record: dict) -> Path:
    """Write ``lenet-{name}.safetensors`` and ``lenet-{name}.json`` (config plus ``record``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{model.name}.safetensors"
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, path)
    sidecar = {"config": asdict(model.config), **record}
    (directory / f"{model.name}.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return path


def feature_extractor_record(name: str, directory: str | Path | None = None) -> dict:
    """The JSON sidecar of an extractor (config, test accuracy, seed, epochs, command)."""
    if name not in FEATURE_EXTRACTORS:
        raise ValueError(
            f"no feature extractor for {name!r}; choose one of {', '.join(FEATURE_EXTRACTORS)}"
        )
    root = ASSETS if directory is None else Path(directory)
    return json.loads((root / f"lenet-{name}.json").read_text())


def load_feature_extractor(name: str, directory: str | Path | None = None) -> LeNet:
    """The classifier for ``name`` in ``FEATURE_EXTRACTORS``, in eval mode without gradients.

    ``directory`` defaults to the weights shipped in ``flowmatch/assets``.
    """
    feature_extractor_record(name, directory)  # checks the name
    root = ASSETS if directory is None else Path(directory)
    return load_feature_file(root / f"lenet-{name}.safetensors")


def load_feature_file(path: str | Path) -> LeNet:
    """A LeNet feature classifier from ``path`` (``.safetensors`` weights) and its JSON sidecar
    beside it (``config``: the ``LeNetConfig``), as ``scripts/train_feature_classifier.py``
    writes them for any labelled image set, a folder included. Weights and sidecar are data
    only (no pickled code); ``ValueError`` (one line) for anything that does not fit."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if path.suffix != ".safetensors" or not path.is_file() or not sidecar.is_file():
        raise ValueError(
            f"{path}: expected a .safetensors file with its .json sidecar beside it "
            "(written by scripts/train_feature_classifier.py)"
        )
    try:
        config = json.loads(sidecar.read_text())["config"]
        model = LeNet(LeNetConfig(**{**config, "channels": tuple(config["channels"])}))
        model.load_state_dict(load_file(path))
    except (KeyError, TypeError, RuntimeError, SafetensorError, ValueError) as error:
        first = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{path}: not a LeNet feature classifier ({type(error).__name__}: {first})"
        ) from None
    return model.eval().requires_grad_(False)


def extract_features(extractor: LeNet, images: Tensor, batch_size: int = 500) -> Tensor:
    """Features ``[N, feature_dim]`` (float64) of ``images: [N, C, H, W]``.

    Float images are taken to be in model space ``[-1, 1]``; uint8 images are mapped to their
    cell centres with the extractor's ``levels``.
    """
    config = extractor.config
    expected = (config.in_channels, config.image_size, config.image_size)
    if tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"{extractor.name} takes images of shape [N, {', '.join(map(str, expected))}], "
            f"got {list(images.shape)}"
        )
    parameter = next(extractor.parameters())
    chunks = []
    with torch.inference_mode():
        for batch in images.split(batch_size):
            batch = batch.to(parameter.device)
            if batch.dtype == torch.uint8:
                batch = to_model_space(batch, config.levels)
            chunks.append(extractor(batch.to(parameter.dtype)).double())
    return torch.cat(chunks)
