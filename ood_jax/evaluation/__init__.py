"""Evaluation without the trainer: the one-call evaluator, tuning on validation OOD, results tables and files.

  evaluate     `evaluate(model, variables, train=, test=, ood=, ...)` -> Report: your own Flax model's OOD table
  evaluator    that call's module: feature extraction, the calibration block, `Report`
  detection    `evaluate_detectors`: detectors fitted, tuned and scored on extracted outputs (the one path)
  tuning       choose each detector's hyperparameters on validation OOD sets only
  leaderboard  the detector leaderboard tables (both FPR conventions, near/far means)
  report       results.json / results.md and the comparison tables across runs
  embeddings   contrastive models: linear probe, embedding statistics (Regmi et al. 2024)

Needs only the core install (jax, flax, optax, chex, numpy).
"""

from ood_jax.evaluation import detection
from ood_jax.evaluation import embeddings
from ood_jax.evaluation import evaluator
from ood_jax.evaluation import leaderboard
from ood_jax.evaluation import report
from ood_jax.evaluation import tuning
from ood_jax.evaluation.evaluator import Report
from ood_jax.evaluation.evaluator import evaluate

__all__ = ['Report', 'detection', 'embeddings', 'evaluate', 'evaluator', 'leaderboard', 'report', 'tuning']
