"""Monitoring: last-prompt-token and answer projections on a persona vector; the paper's monitoring experiments."""

from .drift import DriftVector, Normal, Trajectory, TurnPoint, trajectories, trajectory
from .drift_rule import Alert, DriftRule
from .drift_run import DriftResult, read_conversations, run_drift
from .heatmap import HeatmapItem, color_scale, diverging, render_heatmap
from .report import with_ci
from .run import MONITOR_PROFILES, load_shot_pool, run_monitor
from .trace import Trace, VectorLike, calibrate, project_prompts, trace_generation
from .types import MonitorConfig, MonitorResult

__all__ = [
    "Alert", "DriftResult", "DriftRule", "DriftVector", "Normal", "Trajectory", "TurnPoint", "read_conversations",
    "run_drift", "trajectories", "trajectory",
    "HeatmapItem", "MONITOR_PROFILES", "MonitorConfig", "MonitorResult", "Trace", "VectorLike", "calibrate",
    "color_scale", "diverging", "load_shot_pool", "project_prompts", "render_heatmap", "run_monitor",
    "trace_generation", "with_ci",
]
