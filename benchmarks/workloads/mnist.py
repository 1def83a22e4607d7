"""MNIST with a small U-Net: a short CPU run on real 28x28 digits.

The files are those of ``flowmatch data fetch mnist --dir D``, read by flowmatch's own loader from
``$FLOWMATCH_MNIST_DIR`` (default ``benchmarks/data/mnist``, where ``run.sh`` fetches them).
Training batches are drawn from the 60000 training images in memory with uniform dequantisation,
``y = 2 (v + u) / 256 - 1``, as flowmatch trains (``ImageDataset``); quality is measured against
held-out test images at their cell centres, as flowmatch evaluates, by the Frechet distance and
KID in the features of the LeNet classifier flowmatch ships (``lenet-mnist``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from flowmatch.data.images import ImageData, ImageDataset, load_mnist, to_model_space
from flowmatch.metrics import image_metrics, load_feature_extractor
from flowmatch.nets import FlowMapNet, UNet

from workloads.base import DataMissing, Workload

DIR_VARIABLE = "FLOWMATCH_MNIST_DIR"
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "data" / "mnist"
KID_SEED = 0  # the subsets of the KID estimate


def small_unet(num_times: int = 1) -> UNet:
    """flowmatch's ``UNet`` cut down for a CPU run: 16 channels at 28x28 and 32 at 14x14
    (``channel_mult (1, 2)``), one residual block per level, attention only in the middle block
    (14x14, 4 heads): 178k parameters (``num_times = 1``), a training step at batch 64 on one
    thread in a few tenths of a second. ``num_times = 2`` is the flow-map backbone."""
    return UNet(
        in_channels=1,
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        num_heads=4,
        image_size=28,
        num_groups=8,
        num_times=num_times,
    )


def image_workload(train: ImageData, test: ImageData, name: str = "mnist") -> Workload:
    """The MNIST workload on the given images ``uint8 [N, 1, 28, 28]`` (``mnist_workload`` reads
    the real ones; the smoke test passes synthetic ones)."""
    pool = ImageDataset(train)  # uniform dequantisation, as flowmatch trains
    extractor = load_feature_extractor("mnist")

    def held_out(n: int, generator: torch.Generator) -> Tensor:
        """``n`` distinct test images ``[n, 1, 28, 28]`` at their cell centres."""
        if n > len(test.images):
            raise ValueError(f"{n} held-out images asked for, the test set has {len(test.images)}")
        index = torch.randperm(len(test.images), generator=generator)[:n]
        return to_model_space(test.images[index], test.levels)

    def metrics(samples: Tensor, target: Tensor) -> dict[str, float]:
        """Frechet distance and KID (subsets of half the set) in ``lenet-mnist`` features."""
        found = image_metrics(
            samples,
            target,
            extractor,
            kid_subset_size=len(samples) // 2,
            generator=torch.Generator().manual_seed(KID_SEED),
        )
        return {"fd": found.frechet_distance, "kid": found.kid}

    return Workload(
        name=name,
        sample=pool.sample,
        make_net=small_unet,
        shape=(1, 28, 28),
        make_flow_map=lambda: FlowMapNet(small_unet(num_times=2)),
        batch_sizes=(64,),
        held_out=held_out,
        metrics=metrics,
        metric_labels={"fd": f"FD ({extractor.name})", "kid": f"KID ({extractor.name})"},
        settings={
            "steps": 300,
            "repeats": 3,
            "sampling_n": 256,
            "sampling_nfe": 20,
            "eval_n": 500,
            "euler_steps": (1, 2, 4, 8, 16, 32),
            # dopri5 at 1e-5 spends about 300 NFE on a 300-step network, 1e-4 about 80, for the
            # same FD within its noise: 1e-5 would make dopri5 most of the run's time.
            "tolerance": 1e-4,
        },
        skip={
            "loop": "the training loop's overhead per step is measured on the 2-D workloads, "
            "where the step is cheapest and the overhead shows most",
            "ot": "minibatch OT is compared on the 2-D workloads; seven more U-Net training "
            "variants would multiply this run's length",
        },
    )


def mnist_workload() -> Workload:
    """The MNIST workload on the files in ``$FLOWMATCH_MNIST_DIR`` (default ``DEFAULT_DIR``);
    ``DataMissing`` naming the fetch command if they are not there."""
    directory = Path(os.environ.get(DIR_VARIABLE, DEFAULT_DIR))
    try:
        train, test = load_mnist(directory, "train"), load_mnist(directory, "test")
    except (FileNotFoundError, ValueError) as error:
        raise DataMissing(
            f"MNIST workload: {error} (or point {DIR_VARIABLE} at a folder that holds them)"
        ) from None
    return image_workload(train, test)
