"""peftshield: weight-poisoning backdoors under parameter-efficient fine-tuning, and the PSIM defense."""

__version__ = "0.1.0"
