"""The ``davis`` evaluator plugin: DAVIS-2017 video object segmentation by label propagation (DINO eval_video_segmentation).

Registered in pyproject.toml as ``davis = "evaluators.davis:DavisEvaluator"`` (entry-point group ``dora.evaluators``), as a
third-party plugin would be; see docs/plugins.md.
"""

from evaluators.davis.evaluator import DavisEvaluator

__all__ = ["DavisEvaluator"]
