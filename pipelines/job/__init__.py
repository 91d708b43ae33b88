"""The job core: what every command builds on (docs/ARCHITECTURE.md has the map).

- ``parts``: model, optimizer, schedule, loss, input normalisation and the one training step,
  built from a config and a manifest (pure PyTorch: workers and benchmarks alike).
- ``runner``: the loop on every Train worker and its extension points.
- ``trainer``: the one place a TorchTrainer is made, and a whole training run under MLflow.
- ``session``: the one way a command attaches to or starts Ray.
- ``checks``: everything checked before any cluster resource is taken.
- ``cli``: the command-line flags train and tune share.
- ``final_model``: the final weights and the served MLflow model.
- ``inference``: loading a trained net (checkpoint, run, registry) and scoring images.

Commands import from here, never from each other.
"""
