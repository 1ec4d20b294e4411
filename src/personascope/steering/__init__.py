"""Steering with a persona vector: additive and ablation steering, the guard and its calibration."""

from .calibration import DISTRIBUTIONS, GuardCalibration, calibrate_guard, guard_for, pool_sample, with_calibration
from .guard import GUARD_MODES, CapSpec, Guard
from .steer import POSITIONS, Steerer, SteeringSpec, steer

__all__ = [
    "CapSpec", "DISTRIBUTIONS", "GUARD_MODES", "Guard", "GuardCalibration", "POSITIONS", "Steerer",
    "SteeringSpec", "calibrate_guard", "guard_for", "pool_sample", "steer", "with_calibration",
]
