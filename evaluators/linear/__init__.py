"""The ``linear`` evaluator plugin: linear probe on the last CLS tokens (DINO eval_linear).

Registered in pyproject.toml as ``linear = "evaluators.linear:LinearProbeEvaluator"`` (entry-point group ``dora.evaluators``), as a
third-party plugin would be; see docs/plugins.md.
"""

from evaluators.linear.evaluator import LinearProbeEvaluator

__all__ = ["LinearProbeEvaluator"]
