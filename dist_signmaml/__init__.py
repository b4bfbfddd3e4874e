"""dist_signmaml: a distributed trainer for Sign-MAML (Fan, Ram & Liu, 2021) and its MAML baselines."""

__version__ = "0.1.0"
