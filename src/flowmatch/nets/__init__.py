"""Networks: time and label embeddings, MLP, ADM-style U-Net, guidance, flow-map parametrisation."""

from flowmatch.nets.embeddings import ContextEmbedding, LabelEmbedding, SinusoidalTimeEmbedding
from flowmatch.nets.flow_map import FlowMapNet, warm_start_from_velocity
from flowmatch.nets.guidance import GuidedVelocity, drop_context, drop_labels
from flowmatch.nets.mlp import MLP, FlatItems
from flowmatch.nets.unet import UNet, unet_cifar10_paper, unet_digits, unet_mnist

__all__ = [
    "MLP",
    "ContextEmbedding",
    "FlatItems",
    "FlowMapNet",
    "GuidedVelocity",
    "LabelEmbedding",
    "SinusoidalTimeEmbedding",
    "UNet",
    "drop_context",
    "drop_labels",
    "unet_cifar10_paper",
    "unet_digits",
    "unet_mnist",
    "warm_start_from_velocity",
]
