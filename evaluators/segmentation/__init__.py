"""The ``segmentation`` evaluator plugin: linear segmentation probe on frozen patch tokens (Pascal VOC 2012, ADE20K).

Registered in pyproject.toml as ``segmentation = "evaluators.segmentation:SegmentationEvaluator"`` (entry-point group ``dora.evaluators``), as a
third-party plugin would be; see docs/plugins.md.
"""

from evaluators.segmentation.evaluator import SegmentationEvaluator

__all__ = ["SegmentationEvaluator"]
