"""Train the LeNet feature classifier of one image set and write it to flowmatch/assets.

    python scripts/train_feature_classifier.py digits
    python scripts/train_feature_classifier.py mnist --data-dir /path/to/mnist
    python scripts/train_feature_classifier.py fashion-mnist --data-dir /path/to/fashion-mnist
    python scripts/train_feature_classifier.py folder --data-dir DIR --label mine --out OUT

MNIST and Fashion-MNIST come from `flowmatch data fetch NAME --dir D`. A folder needs one
sub-folder per class; it is split as its runs are (--test-fraction, data.test_fraction), and
`flowmatch eval RUN --features OUT/lenet-LABEL.safetensors` measures a run in its features.
Training uses the train
split with uniform dequantisation noise as the only augmentation; test accuracy is measured on the
test split at cell centres. Everything random derives from --seed; the run is on the CPU.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from flowmatch.data.images import ImageData, load_image_set, to_model_space
from flowmatch.metrics.features import (
    ASSETS,
    FEATURE_EXTRACTORS,
    LeNet,
    LeNetConfig,
    save_feature_extractor,
)

DEFAULT_EPOCHS = {"digits": 30, "mnist": 5, "fashion-mnist": 6, "folder": 20}
# two poolings for 8x8 digits (8 -> 2), three for 28x28 (28 -> 3)
DEFAULT_CHANNELS = {"digits": (32, 64), "mnist": (16, 32, 32), "fashion-mnist": (16, 32, 32)}


def default_channels(name: str, size: int) -> tuple[int, ...]:
    """The shipped sets' widths; a folder pools twice up to 16x16 images, three times above."""
    if name in DEFAULT_CHANNELS:
        return DEFAULT_CHANNELS[name]
    return (32, 64) if size <= 16 else (16, 32, 32)


def accuracy(model: LeNet, data: ImageData) -> float:
    """Fraction of ``data`` classified correctly, inputs at their cell centres."""
    with torch.inference_mode():
        logits = torch.cat(
            [model.classify(to_model_space(x, data.levels)) for x in data.images.split(1000)]
        )
    return (logits.argmax(-1) == data.labels).double().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=[*FEATURE_EXTRACTORS, "folder"])
    parser.add_argument(
        "--data-dir", type=Path, help="folder of the IDX files or images (not for digits)"
    )
    parser.add_argument("--label", help="folder: the extractor's name (lenet-LABEL)")
    parser.add_argument(
        "--test-fraction", type=float, default=0.1, help="folder: data.test_fraction of its runs"
    )
    parser.add_argument("--out", type=Path, default=ASSETS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="default: " + str(DEFAULT_EPOCHS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    epochs = args.epochs or DEFAULT_EPOCHS[args.name]
    torch.set_num_threads(args.threads)

    if args.name == "folder" and args.label is None:
        parser.error("folder needs --label NAME (the extractor is saved as lenet-NAME)")
    train = load_image_set(args.name, args.data_dir, "train", args.test_fraction)
    test = load_image_set(args.name, args.data_dir, "test", args.test_fraction)
    if train.labels is None or test.labels is None:
        parser.error(f"{args.data_dir} has no labels: put each class in its own sub-folder")
    channels, size, _ = train.images.shape[1:]
    config = LeNetConfig(
        name=args.label or args.name,
        levels=train.levels,
        in_channels=channels,
        image_size=size,
        channels=default_channels(args.name, size),
        num_classes=int(train.labels.max()) + 1,
    )
    torch.manual_seed(args.seed)  # parameter initialisation
    model = LeNet(config)
    generator = torch.Generator().manual_seed(args.seed)  # batch order and dequantisation
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = -(-len(train.images) // args.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)

    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(train.images), generator=generator)
        total = 0.0
        for index in order.split(args.batch_size):
            pixels = train.images[index]
            noise = torch.rand(pixels.shape, generator=generator)
            loss = F.cross_entropy(
                model.classify(to_model_space(pixels, train.levels, noise)), train.labels[index]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
        print(
            f"epoch {epoch + 1}/{epochs}  loss {total / len(train.images):.4f}  "
            f"{time.perf_counter() - start:.0f}s",
            flush=True,
        )

    model.eval()
    test_accuracy = accuracy(model, test)
    command = "python scripts/train_feature_classifier.py " + shlex.join(sys.argv[1:])
    record = {
        "test_accuracy": test_accuracy,
        "train_accuracy": accuracy(model, train),
        "test_size": len(test.images),
        "seed": args.seed,
        "epochs": epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "optimizer": "Adam, cosine decay to 0",
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch_version": torch.__version__,
        "command": command,
    }
    path = save_feature_extractor(model, args.out, record)
    print(f"test accuracy {test_accuracy:.4f}; wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
