"""Workloads: one small module each, registered in ``WORKLOADS`` by name.

A workload is the data, the network and the measurement settings shared by every library. A new
one (MNIST with a small U-Net) is a module that builds a ``Workload`` and one line below.
"""

from workloads.base import Workload
from workloads.checkerboard import CHECKERBOARD
from workloads.gmm import GMM

WORKLOADS: dict[str, Workload] = {w.name: w for w in (CHECKERBOARD, GMM)}

__all__ = ["WORKLOADS", "Workload"]
