"""Evaluator plugins for ``dora validate --evaluator NAME --ckpt_path CKPT`` (docs/plugins.md, docs/evaluation.md).

The contract and discovery:

* :mod:`evaluators.base` - the :class:`~evaluators.base.Evaluator` contract every plugin implements, and
  :class:`~evaluators.base.EvaluationDataError` for missing or malformed evaluation data.
* :mod:`evaluators.registry` - discovery through the ``dora.evaluators`` entry-point group (plus built-ins).
* :mod:`evaluators.results` - ``results_<name>.json`` and the printed table.
* :mod:`evaluators.sampling` - unrepeated DDP samplers, so that every validation item is scored once.

Image classification (ImageFolder layout):

* :mod:`evaluators.knn` - weighted k-NN on the CLS token (DINO ``eval_knn``).
* :mod:`evaluators.linear` - linear probe on the last CLS tokens (DINO ``eval_linear``); its Lightning module is in
  :mod:`evaluators.linear_module`.
* :mod:`evaluators.image_data` - the ImageFolder data module both use.

Semantic segmentation (Pascal VOC 2012, ADE20K):

* :mod:`evaluators.segmentation` - linear segmentation probe on frozen patch tokens; its Lightning module is in
  :mod:`evaluators.segmentation_module`.
* :mod:`evaluators.seg_data` - the data set and data module; :mod:`evaluators.seg_layouts` finds and checks the
  layouts and encodes the labels.

Video object segmentation (DAVIS-2017):

* :mod:`evaluators.davis` - semi-supervised label propagation (DINO ``eval_video_segmentation``).
* :mod:`evaluators.davis_data` - reading and checking DAVIS-2017 folders.
* :mod:`evaluators.davis_metrics` - J and F as ``davis2017-evaluation`` computes them.
* :mod:`evaluators.label_propagation` - the propagation of labels over frames.

Synthetic data (no download):

* :mod:`evaluators.synthetic` - small DAVIS / VOC / ADE20K stand-ins (``python -m evaluators.synthetic``); the shapes
  are drawn by :mod:`evaluators.synthetic_shapes`.

Submodules are imported on demand; importing this package imports nothing heavy.
"""
