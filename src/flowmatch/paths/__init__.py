"""Probability paths: schedules, affine Gaussian paths, conversions, time samplers."""

from flowmatch.paths.affine import AffinePath, PathSample, convert
from flowmatch.paths.schedules import (
    SCHEDULES,
    CondOTSchedule,
    CosineSchedule,
    Schedule,
    VESchedule,
    VPSchedule,
)
from flowmatch.paths.time_samplers import LogitNormalTimeSampler, UniformTimeSampler

__all__ = [
    "SCHEDULES",
    "AffinePath",
    "CondOTSchedule",
    "CosineSchedule",
    "LogitNormalTimeSampler",
    "PathSample",
    "Schedule",
    "UniformTimeSampler",
    "VESchedule",
    "VPSchedule",
    "convert",
]
