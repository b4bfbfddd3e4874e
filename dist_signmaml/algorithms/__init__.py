"""Meta-learning math: inner rules, the shared inner loop, and the MetaLearner module. No accelerate/deepspeed here."""

from dist_signmaml.algorithms.inner import adapt, task_loss, task_outcome
from dist_signmaml.algorithms.learner import MetaLearner, MetaOutput
from dist_signmaml.algorithms.rules import ALGORITHMS, InnerRule, make_rule, sgd_step, sign_step, signum_step

__all__ = ["ALGORITHMS", "InnerRule", "MetaLearner", "MetaOutput", "adapt", "make_rule", "sgd_step", "sign_step",
           "signum_step", "task_loss", "task_outcome"]
