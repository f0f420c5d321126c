"""Triggers (poisoners): each module registers itself in :data:`POISONERS`."""

from peftshield.attacks import adaptive, badnet, insent, neuba, por, syntactic  # noqa: F401  (registration)
from peftshield.attacks.base import (
    POISONERS,
    PoisonedData,
    Poisoner,
    PoisonRecord,
    PoisonSpec,
    asr_rows,
    build_asr_set,
    check_target,
    poison_candidates,
    poison_dataset,
)

__all__ = [
    "POISONERS", "PoisonedData", "Poisoner", "PoisonRecord", "PoisonSpec",
    "asr_rows", "build_asr_set", "check_target", "poison_candidates", "poison_dataset",
]
