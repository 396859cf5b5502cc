"""The ``knn`` evaluator plugin: k-NN classification on the frozen CLS token (DINO eval_knn).

Registered in pyproject.toml as ``knn = "evaluators.knn:KNNEvaluator"`` (entry-point group ``dora.evaluators``), as a
third-party plugin would be; see docs/plugins.md.
"""

from evaluators.knn.evaluator import KNNEvaluator

__all__ = ["KNNEvaluator"]
