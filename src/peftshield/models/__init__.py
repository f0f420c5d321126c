"""Backbones: loading, saving, and the offline default encoder."""

from peftshield.models.backbone import DEFAULT_BACKBONE, Backbone, load_backbone, resolve_backbone, save_backbone

__all__ = ["DEFAULT_BACKBONE", "Backbone", "load_backbone", "resolve_backbone", "save_backbone"]
