"""The evaluation contract the host owns, and what plugins share (docs/plugins.md, docs/evaluation.md).

* :mod:`.contract` - :class:`~.contract.Evaluator`, the base class every plugin implements, and
  :class:`~.contract.EvaluationDataError` for missing or malformed evaluation data.
* :mod:`.registry` - discovery through the ``dora.evaluators`` entry-point group (plus the built-ins of a checkout).
* :mod:`.results` - ``results_<name>.json`` and the printed table.
* :mod:`.sampling` - unrepeated DDP samplers, so that every validation item is scored once.
* :mod:`.image_data` - the ImageFolder data module of the image-classification probes.
* :mod:`.palette` - the DAVIS / VOC palette of mask PNGs.
* :mod:`.synthetic` (with :mod:`.synthetic_shapes`) - small DAVIS / VOC / ADE20K / shapes stand-ins generated from the
  bundled videos (``python -m dora_lightning.evaluation.synthetic``), for the demo and the tests.

The built-in plugins live in the top-level ``evaluators`` package, one subpackage each (``evaluators.knn``,
``evaluators.linear``, ``evaluators.segmentation``, ``evaluators.davis``); they import this package, never the reverse.
Submodules are imported on demand; importing this package imports nothing heavy.
"""
