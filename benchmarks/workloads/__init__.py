"""Workloads: one small module each, registered in ``WORKLOADS`` by name.

A workload is the data, the network and the measurement settings shared by every library.
``WORKLOADS[name]()`` builds it: the 2-D ones are ready-made, MNIST reads its files then (and
raises ``DataMissing`` naming the fetch command if they are absent).
"""

from collections.abc import Callable

from workloads.base import DataMissing, Workload
from workloads.checkerboard import CHECKERBOARD
from workloads.gmm import GMM
from workloads.mnist import image_workload, mnist_workload

WORKLOADS: dict[str, Callable[[], Workload]] = {
    "checkerboard": lambda: CHECKERBOARD,
    "gmm": lambda: GMM,
    "mnist": mnist_workload,
}

__all__ = ["WORKLOADS", "DataMissing", "Workload", "image_workload"]
