"""2-D Gaussian mixture with an exact log-density (flowmatch.data's ``gmm``), the MLP network."""

from flowmatch.data import GaussianMixture2D

from common import flow_map_mlp, velocity_mlp
from workloads.base import Workload

_TARGET = GaussianMixture2D()

GMM = Workload(
    name="gmm",
    sample=_TARGET.sample,
    make_net=lambda: velocity_mlp(2),
    shape=(2,),
    make_flow_map=lambda: flow_map_mlp(2),
    log_prob=_TARGET.log_prob,
    batch_sizes=(512,),  # same network and dimension as checkerboard: 4096 would repeat it
)
