"""Probability paths: schedules, affine Gaussian paths, conversions, time and time-pair samplers."""

from flowmatch.paths.affine import AffinePath, PathSample, convert
from flowmatch.paths.schedules import (
    SCHEDULES,
    CondOTSchedule,
    CosineSchedule,
    Schedule,
    VESchedule,
    VPSchedule,
)
from flowmatch.paths.time_pairs import DiagonalSplitTimePairs, LogitNormalTimePairs, TimePairs
from flowmatch.paths.time_samplers import LogitNormalTimeSampler, UniformTimeSampler

__all__ = [
    "SCHEDULES",
    "AffinePath",
    "CondOTSchedule",
    "CosineSchedule",
    "DiagonalSplitTimePairs",
    "LogitNormalTimePairs",
    "LogitNormalTimeSampler",
    "PathSample",
    "Schedule",
    "TimePairs",
    "UniformTimeSampler",
    "VESchedule",
    "VPSchedule",
    "convert",
]
