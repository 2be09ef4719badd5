"""The one training loop, checkpoints, the run's folder, ``jaxcf.fit``, and the experiments built on them
(cross-validation, strong generalisation)."""
