"""Backbones: single-device and vmap-safe; BatchNorm always uses the statistics of the batch it sees."""

from dist_signmaml.models.registry import (BACKBONES, adapted_parameter_names, build_backbone, check_adapt_spec,
                                           load_weights, parameter_blocks, resolve_channels_last)

__all__ = ["BACKBONES", "adapted_parameter_names", "build_backbone", "check_adapt_spec", "load_weights",
           "parameter_blocks", "resolve_channels_last"]
