"""Evaluator plugins for ``dora validate --evaluator NAME --ckpt_path CKPT`` (docs/plugins.md, docs/evaluation.md).

* :mod:`evaluators.base` - the :class:`~evaluators.base.Evaluator` contract every plugin implements.
* :mod:`evaluators.registry` - discovery through the ``dora.evaluators`` entry-point group (plus built-ins).
* :mod:`evaluators.knn` - weighted k-NN on the CLS token (DINO ``eval_knn``).
* :mod:`evaluators.linear` - linear probe on the last CLS tokens (DINO ``eval_linear``).
* :mod:`evaluators.image_data` - the ImageFolder data module both use.
* :mod:`evaluators.results` - ``results_<name>.json`` and the printed table.

Submodules are imported on demand; importing this package imports nothing heavy.
"""
