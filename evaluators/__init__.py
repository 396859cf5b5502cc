"""The built-in evaluator plugins of ``dora validate --evaluator NAME --ckpt_path CKPT``, one subpackage each, each
registered in pyproject.toml's ``dora.evaluators`` entry-point group as a third-party plugin would be:

* :mod:`evaluators.knn` - weighted k-NN on the CLS token (DINO ``eval_knn``).
* :mod:`evaluators.linear` - linear probe on the last CLS tokens (DINO ``eval_linear``).
* :mod:`evaluators.segmentation` - linear segmentation probe on frozen patch tokens (Pascal VOC 2012, ADE20K).
* :mod:`evaluators.davis` - DAVIS-2017 video object segmentation by label propagation (DINO
  ``eval_video_segmentation``).

They depend on the contract in :mod:`dora_lightning.evaluation` (base class, data errors, samplers, image data);
``dora_lightning`` never imports them (it finds them by entry point). Importing this package imports nothing heavy.
"""
