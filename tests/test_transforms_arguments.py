"""ClipMultiCrop's arguments: bad values refused by name, typed for jsonargparse (LightningCLI), listed in its repr,
and the default crop backend."""

from __future__ import annotations

import pytest

from dora_lightning.data.augment.multicrop import CROP_BACKENDS, ClipMultiCrop


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"global_size": 0}, "global_size"),
        ({"local_size": -3}, "local_size"),
        ({"global_size": 2.5}, "global_size"),
        ({"pre_crop_size": 0}, "pre_crop_size"),
        ({"num_global_crops": 0}, "num_global_crops"),
        ({"num_local_crops": -1}, "num_local_crops"),
        ({"pre_crop_scale": (0.0, 1.0)}, "pre_crop_scale"),
        ({"global_scale": (0.6, 0.5)}, "global_scale"),
        ({"local_scale": (0.1, 1.5)}, "local_scale"),
        ({"local_scale": (0.1,)}, "local_scale"),
        ({"global_flip_prob": 1.5}, "global_flip_prob"),
        ({"jitter_prob": -0.1}, "jitter_prob"),
        ({"grayscale_prob": 2.0}, "grayscale_prob"),
        ({"global_blur_prob": -1.0}, "global_blur_prob"),
        ({"local_blur_prob": float("nan")}, "local_blur_prob"),
        ({"global_solarize_prob": 1.2}, "global_solarize_prob"),
        ({"local_flip_prob": -0.5}, "local_flip_prob"),
        ({"recipe": "simclr"}, "recipe"),
        ({"brightness": -0.1}, "brightness"),
        ({"contrast": -1.0}, "contrast"),
        ({"saturation": -0.5}, "saturation"),
        ({"hue": 0.6}, "hue"),
        ({"blur_sigma": (0.0, 1.0)}, "blur_sigma"),
        ({"blur_sigma": (2.0, 1.0)}, "blur_sigma"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.2, 0.2, 0.0)}, "std"),
        ({"crop_backend": "bicubic"}, "crop_backend"),
        ({"colour_backend": "hsv"}, "colour_backend"),
        ({"output_dtype": "float16"}, "output_dtype"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ClipMultiCrop(**kwargs)


def test_configurable_with_jsonargparse():
    """LightningCLI exposes the typed __init__ arguments through jsonargparse."""
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ClipMultiCrop, "aug")
    args = ["--aug.global_size=64", "--aug.local_scale=[0.1, 0.3]", "--aug.pre_crop_size=null"]
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    t = instantiate(parser.parse_args([*args, "--aug.crop_backend=roi_align"])).aug
    assert (t.global_size, t.local_scale, t.pre_crop_size, t.crop_backend) == (
        64,
        (0.1, 0.3),
        None,
        "roi_align",
    )
    assert parser.get_defaults().aug.local_size == 112
    assert parser.get_defaults().aug.crop_backend == "interpolate"
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_args(["--aug.crop_backend=bicubic"])


def test_repr_lists_arguments():
    assert "local_scale=(0.05, 0.4)" in repr(ClipMultiCrop())


def test_default_crop_backend_is_interpolate():
    assert CROP_BACKENDS == ("roi_align", "interpolate")
    assert ClipMultiCrop().crop_backend == "interpolate"
    assert "crop_backend='interpolate'" in repr(ClipMultiCrop())
