"""Evaluation without the trainer: tuning on validation OOD, results tables and files, embedding metrics.

  tuning       choose each detector's hyperparameters on validation OOD sets only
  leaderboard  the detector leaderboard tables (both FPR conventions, near/far means)
  report       results.json / results.md and the comparison tables across runs
  embeddings   contrastive models: linear probe, embedding statistics (paper 003)

Needs only the core install (jax, flax, optax, chex, numpy).
"""

from ood_jax.evaluation import embeddings
from ood_jax.evaluation import leaderboard
from ood_jax.evaluation import report
from ood_jax.evaluation import tuning

__all__ = ['embeddings', 'leaderboard', 'report', 'tuning']
