"""Shared maths and plumbing, below every model family: errors, files, the config's core, linear algebra,
per-row solves, scoring, metrics, optimizers, the mesh."""
