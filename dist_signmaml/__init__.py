"""dist_signmaml: a distributed trainer for Sign-MAML (Fan, Ram & Liu, 2021) and its MAML baselines.

`dist_signmaml.load(RUN)` rebuilds a trained model for adapting and predicting (docs/predict.md).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported on first use: `import dist_signmaml.train` (and the shard tools) must not pay for it, and importing
    # the training modules here would run them twice under `python -m dist_signmaml.train`.
    if name == "load":
        from dist_signmaml.inference import load

        return load
    raise AttributeError(f"module 'dist_signmaml' has no attribute {name!r}")
