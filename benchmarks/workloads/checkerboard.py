"""2-D checkerboard (uniform on 8 unit squares of ``[-2, 2]^2``), the MLP velocity network."""

from flowmatch.data import Checkerboard

from common import flow_map_mlp, velocity_mlp
from workloads.base import Workload

CHECKERBOARD = Workload(
    name="checkerboard",
    sample=Checkerboard().sample,
    make_net=lambda: velocity_mlp(2),
    shape=(2,),
    make_flow_map=lambda: flow_map_mlp(2),
)
