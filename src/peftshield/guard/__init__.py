"""The guard in front of a deployed model: a victim classifier screened by a PSIM.

- :class:`Guard` (Python API), :class:`GuardResult`;
- :mod:`peftshield.guard.batcher`: dynamic micro-batching;
- :mod:`peftshield.guard.calibration`: thresholds per text length on the deployment's own texts (``peftshield calibrate``);
- :mod:`peftshield.guard.server`: the HTTP service of ``peftshield serve`` (its endpoints in :mod:`peftshield.guard.routes`).
"""

from peftshield.guard.guard import Guard, GuardResult
from peftshield.guard.settings import MODES

__all__ = ["MODES", "Guard", "GuardResult"]
