"""HDR video (PQ / HLG, BT.2020) trains on tone-mapped SDR frames (dora_lightning/data/hdr.py, docs/data.md "Which
files train"): the transfer functions against hand-computed values, the tone curve's shape, and the decode path
(RangeReader, read_video_frames) on generated HLG and PQ files; SDR files decode exactly as before."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from video_colour_fixtures import bt2020_yuv10, hdr, sized
from video_encode import Fixture

from dora_lightning.data import hdr as tone
from dora_lightning.data.decode_stats import DecodeStats
from dora_lightning.data.reader import RangeReader, frame_to_rgb, frame_tone_map, to_pixels
from dora_lightning.data.sources import probe_video
from dora_lightning.evaluation.video_frames import read_video_frames

PQ_203 = 0.580689  # PQ signal of 203 cd/m2 (inverse EOTF, hand-computed from ST 2084's constants)
HLG_WHITE = 0.75  # HLG reference white signal (BT.2408)
# sRGB code of reference white: highlight_curve(1.0) = 0.8754, sRGB-encoded 0.9432, x 255 (codes 240 or 241)
GREY_WHITE = 240.5
HLG_COLOUR, PQ_COLOUR = (0.6, 0.45, 0.3), (0.55, 0.45, 0.35)


def codes_of(signal, shape=(2, 2)) -> np.ndarray:
    """A uniform (H, W, 3) rgb48 array of the non-linear signal ``signal`` (one value or R'G'B')."""
    return np.full((*shape, 3), np.round(np.asarray(signal) * 65535), dtype=np.uint16)


# --- transfer functions, primaries, curve -------------------------------------------------------------------------


def test_pq_eotf_matches_hand_computed_luminance():
    """ST 2084: signal 0 is 0 cd/m2, 1 is 10,000, 0.5 is 92.25 and 0.580689 is 203 (reference white)."""
    assert tone.pq_eotf(0.0) == 0.0
    assert tone.pq_eotf(1.0) == pytest.approx(10000.0)
    assert tone.pq_eotf(0.5) == pytest.approx(92.246, abs=0.01)
    assert tone.pq_eotf(PQ_203) == pytest.approx(203.0, abs=0.05)


def test_hlg_inverse_oetf_matches_hand_computed_scene_light():
    """ARIB STD-B67: E'^2 / 3 up to 0.5 (1/12 there), the log segment above it (1.0 at 1.0); 0.75 is 0.26496, which
    the OOTF of a 1000 cd/m2 display (1000 * Y^1.2 on grey) shows at 203 cd/m2, BT.2408's reference white."""
    assert tone.hlg_inverse_oetf(0.25) == pytest.approx(0.0625 / 3)
    assert tone.hlg_inverse_oetf(0.5) == pytest.approx(1 / 12)
    assert tone.hlg_inverse_oetf(0.5 + 1e-9) == pytest.approx(1 / 12)  # continuous at the joint
    assert tone.hlg_inverse_oetf(1.0) == pytest.approx(1.0, abs=1e-6)
    scene = tone.hlg_inverse_oetf(HLG_WHITE)
    assert scene == pytest.approx(0.264963, abs=1e-5)
    assert 1000 * scene**1.2 == pytest.approx(203.15, abs=0.05)


def test_bt2020_to_bt709_matrix_is_bt2087s():
    expected = [[1.6605, -0.5876, -0.0728], [-0.1246, 1.1329, -0.0083], [-0.0182, -0.1006, 1.1187]]
    np.testing.assert_allclose(tone.primaries_matrix(tone.BT2020_PRIMARIES), expected, atol=1e-4)
    np.testing.assert_allclose(tone.primaries_matrix(tone.BT709_PRIMARIES), np.eye(3), atol=1e-12)
    display_p3 = [[1.2249, -0.2249, 0.0], [-0.0421, 1.0421, 0.0], [-0.0196, -0.0786, 1.0983]]
    np.testing.assert_allclose(tone.primaries_matrix(tone.P3_D65_PRIMARIES), display_p3, atol=1e-4)


def test_highlight_curve_keeps_light_under_the_knee_and_reaches_white_at_the_peak():
    """Identity up to 0.75; slope 1 at the knee (no kink); reference white 1.0 -> 0.8754; 1000 cd/m2 (4.93) -> 1.0;
    brighter stays 1.0; increasing throughout."""
    below = np.linspace(0, tone.KNEE, 50, dtype=np.float32)
    np.testing.assert_array_equal(tone.highlight_curve(below), below)
    step = 1e-3
    slope = (tone.highlight_curve(tone.KNEE + step) - tone.highlight_curve(tone.KNEE)) / step
    assert slope == pytest.approx(1.0, abs=0.01)
    assert tone.highlight_curve(1.0) == pytest.approx(0.87545, abs=1e-4)
    assert tone.highlight_curve(tone.PEAK) == pytest.approx(1.0, abs=1e-5)
    assert tone.highlight_curve(10 * tone.PEAK) == 1.0
    ramp = tone.highlight_curve(np.linspace(0, 2 * tone.PEAK, 10_000, dtype=np.float32))
    assert np.all(np.diff(ramp) >= 0) and np.all(np.diff(ramp[ramp < 1]) > 0)


def test_only_pq_and_hlg_are_hdr():
    assert tone.is_hdr(tone.PQ) and tone.is_hdr(tone.HLG)
    for sdr in (0, 1, 2, 13, 14, 15):  # reserved, BT.709, unspecified, sRGB, BT.2020 10- and 12-bit
        assert not tone.is_hdr(sdr) and tone.tone_map_for(sdr, tone.BT2020_PRIMARIES) is None
    shared = tone.tone_map_for(tone.HLG, tone.BT2020_PRIMARIES)
    assert shared is tone.tone_map_for(tone.HLG, tone.BT2020_PRIMARIES)  # tables built once
    unspecified = tone.tone_map_for(tone.PQ, tone.UNSPECIFIED_PRIMARIES)
    assert unspecified.primaries == tone.BT2020_PRIMARIES
    with pytest.raises(ValueError, match="not PQ"):
        tone.ToneMap(1)


def test_srgb_encoding_matches_iec_61966_2_1():
    np.testing.assert_allclose(
        tone.srgb_encode([0.0, 0.002, 0.18, 0.5, 1.0]), [0, 0.02584, 0.46135, 0.73536, 1], atol=1e-5
    )


# --- ToneMap on signal codes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("transfer", [tone.PQ, tone.HLG], ids=["pq", "hlg"])
def test_signal_zero_is_black_and_full_scale_is_white(transfer):
    tone_map = tone.ToneMap(transfer)
    assert tone_map(codes_of(0.0)).max() == 0
    assert tone_map(codes_of(1.0)).min() == 255


@pytest.mark.parametrize(("transfer", "white"), [(tone.PQ, PQ_203), (tone.HLG, HLG_WHITE)], ids=["pq", "hlg"])
def test_reference_white_maps_just_under_sdr_white(transfer, white):
    """203 cd/m2 is SDR 1.0 before the highlight curve, 0.8754 after it: sRGB 240.5, codes 240 or 241, grey."""
    out = tone.ToneMap(transfer)(codes_of(white))
    assert np.all(np.abs(out.astype(float) - GREY_WHITE) <= 0.5), out[0, 0]


@pytest.mark.parametrize("transfer", [tone.PQ, tone.HLG], ids=["pq", "hlg"])
def test_grey_stays_grey_and_brighter_signal_is_never_darker(transfer):
    """Grey levels (R = G = B in BT.2020) give R = G = B, non-decreasing in the signal; raising one channel's signal
    never lowers that output channel (the others may fall: the largest channel sets the highlight compression, and
    the BT.709 matrix subtracts)."""
    tone_map = tone.ToneMap(transfer)
    grey = tone_map(np.repeat(np.arange(0, 65536, 64, dtype=np.uint16)[None, :, None], 3, axis=2))[0]
    assert np.all(grey[:, 0] == grey[:, 1]) and np.all(grey[:, 1] == grey[:, 2])
    assert np.all(np.diff(grey[:, 0].astype(int)) >= 0) and grey[-1, 0] == 255
    base = np.random.default_rng(1).integers(0, 65536, (40, 1, 3), dtype=np.uint16)
    for channel in range(3):
        codes = np.repeat(base, 256, axis=1)
        codes[..., channel] = np.arange(0, 65536, 256, dtype=np.uint16)
        assert np.all(np.diff(tone_map(codes)[..., channel].astype(int), axis=1) >= 0)


@pytest.mark.parametrize("transfer", [tone.PQ, tone.HLG], ids=["pq", "hlg"])
def test_out_of_gamut_bt2020_green_is_clipped_not_wrapped(transfer):
    """BT.2020's green is outside BT.709: its red and blue come out negative (-0.59, -0.10 of its green) and are
    clipped to 0, never wrapped to bright values; green stays bright."""
    out = tone.ToneMap(transfer)(codes_of((0.0, 0.75, 0.0)))[0, 0]
    assert out[0] == 0 and out[2] == 0 and out[1] > 200, out


def reference_tone_map(transfer: int, signal: np.ndarray) -> np.ndarray:
    """The tone mapping in float64, one step after another with no tables: (N, 3) signal -> (N, 3) sRGB codes."""
    if transfer == tone.PQ:
        light = tone.pq_eotf(signal) / 203
    else:
        scene = tone.hlg_inverse_oetf(signal)
        luminance = scene @ [0.2627, 0.6780, 0.0593]
        light = scene * (1000 / 203 * luminance**0.2)[:, None]
    light = np.maximum(light @ tone.primaries_matrix(tone.BT2020_PRIMARIES).T, 0)
    brightest = light.max(axis=1, keepdims=True)
    light = light * tone.highlight_curve(brightest).astype(np.float64) / np.maximum(brightest, 1e-12)
    return tone.srgb_encode(light) * 255


@pytest.mark.parametrize("transfer", [tone.PQ, tone.HLG], ids=["pq", "hlg"])
def test_tables_match_the_step_by_step_math(transfer):
    """The lookup tables (65,536 codes in, 4,096 linear levels out) stay within one 8-bit code of the float64 math
    on random colours, dark ones included."""
    rng = np.random.default_rng(2)
    codes = np.concatenate([rng.integers(0, 65536, (4000, 3)), rng.integers(0, 6000, (4000, 3))]).astype(
        np.uint16
    )
    got = tone.ToneMap(transfer)(codes[None])[0].astype(float)
    assert np.abs(got - reference_tone_map(transfer, codes / 65535)).max() <= 1.0


def test_output_keeps_the_frame_shape_as_uint8_and_adds_opaque_alpha():
    tone_map = tone.ToneMap(tone.HLG)
    codes = np.random.default_rng(0).integers(0, 65536, (7, 5, 3), dtype=np.uint16)
    rgb, rgba = tone_map(codes), tone_map(codes, channels=4)
    assert (rgb.shape, rgb.dtype, rgba.shape, rgba.dtype) == ((7, 5, 3), np.uint8, (7, 5, 4), np.uint8)
    np.testing.assert_array_equal(rgba[..., :3], rgb)
    assert np.all(rgba[..., 3] == 255)
    with pytest.raises(ValueError, match="uint16"):
        tone_map(codes.astype(np.uint8))


# --- colour tags and swscale's conversion -------------------------------------------------------------------------


def yuv_frame(signal, colorspace: int, transfer: int = 2) -> av.VideoFrame:
    """A 4x4 10-bit BT.2020 limited-range frame of ``signal``, tagged with the matrix ``colorspace``."""
    frame = av.VideoFrame.from_ndarray(bt2020_yuv10(np.full((4, 4, 3), signal)), format="yuv420p10le")
    frame.colorspace, frame.color_range, frame.color_trc = colorspace, 1, transfer
    return frame


def test_tags_come_from_the_frame_else_from_the_stream():
    untagged, pq = yuv_frame(0.5, 9), yuv_frame(0.5, 9, transfer=tone.PQ)
    assert frame_tone_map(untagged, (2, 2)) is None
    assert frame_tone_map(untagged, (tone.HLG, tone.BT2020_PRIMARIES)).transfer == tone.HLG
    assert frame_tone_map(pq, (2, 2)).transfer == tone.PQ
    assert frame_tone_map(pq, (tone.HLG, 2)).transfer == tone.PQ


def test_hdr_frame_without_a_matrix_tag_is_read_with_bt2020s():
    tone_map = tone.ToneMap(tone.HLG)
    tagged = frame_to_rgb(yuv_frame(HLG_COLOUR, 9), 4, 4, "rgb24", tone_map)
    np.testing.assert_array_equal(frame_to_rgb(yuv_frame(HLG_COLOUR, 2), 4, 4, "rgb24", tone_map), tagged)
    bt709 = frame_to_rgb(yuv_frame(HLG_COLOUR, 1), 4, 4, "rgb24", tone_map)
    assert np.abs(bt709.astype(int) - tagged).max() > 3


# --- decoding files -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Fixture]:
    folder = tmp_path_factory.mktemp("hdr")
    return {
        "hlg": hdr(folder, "hlg", (HLG_WHITE,) * 3, HLG_COLOUR),
        "pq": hdr(folder, "pq", (PQ_203,) * 3, PQ_COLOUR),
        "sdr": sized(folder, "sdr10.mp4", (96, 64), "yuv420p10le", n=30),
    }


def read_all(path: Path, size: tuple[int, int], **options) -> dict[int, np.ndarray]:
    info = probe_video(str(path), path.parent / "index")
    reader = RangeReader(info, 0, info.num_frames, size, lambda i: True, DecodeStats(), **options)
    return {index: frame for index, frame in reader}


@pytest.mark.parametrize("name", ["hlg", "pq"])
@pytest.mark.parametrize(("pixel_format", "compact"), [("rgb24", False), ("rgba", False), ("rgb24", True)])
def test_hdr_file_decodes_to_the_tone_mapped_colours(files, name, pixel_format, compact):
    """Every frame's top half (reference white) is SDR grey 240 +- 2 (swscale scales 10-bit limited range to
    255/256 of full scale, ~1 code here) and its bottom half the tone-mapped colour +- 2, far from the untone-mapped
    conversion; compact readers keep HDR frames as tone-mapped arrays."""
    frames = read_all(files[name].path, (48, 32), pixel_format=pixel_format, compact=compact)
    assert sorted(frames) == list(range(30))
    colour = files[name].notes["signals"][1]
    expected = tone.ToneMap(tone.HLG if name == "hlg" else tone.PQ)(codes_of(colour, (1, 1)))[0, 0]
    channels = 4 if pixel_format == "rgba" else 3
    for frame in frames.values():
        assert isinstance(frame, np.ndarray) and frame.shape == (32, 48, channels) and frame.dtype == np.uint8
        pixels = to_pixels(frame, pixel_format).astype(int)
        assert np.abs(pixels[2:14, :, :3] - GREY_WHITE).max() <= 2.5, pixels[8, 8]
        assert np.abs(pixels[18:30, :, :3] - expected).max() <= 2, (pixels[24, 24], expected)
    with av.open(str(files[name].path)) as container:
        plain = next(container.decode(video=0)).to_ndarray(format="rgb24", width=48, height=32)
    assert plain[8, 8, 0] < GREY_WHITE - 40 and np.abs(plain[24, 24].astype(int) - expected).max() > 20


@pytest.mark.parametrize(("pixel_format", "compact"), [("rgb24", False), ("rgba", False), ("rgba", True)])
def test_sdr_file_decodes_byte_identically(files, pixel_format, compact):
    """A 10-bit SDR file (no HDR tag) converts exactly as swscale's rgb24 / rgba output at the reader's size."""
    path = files["sdr"].path
    frames = read_all(path, (40, 26), pixel_format=pixel_format, compact=compact)
    with av.open(str(path)) as container:
        decoded = list(container.decode(video=0))
    assert sorted(frames) == list(range(len(decoded)))
    for index, frame in enumerate(decoded):
        if compact:
            scaled = frame.reformat(40, 26, "yuv420p", interpolation="AREA", threads=1)
            assert isinstance(frames[index], av.VideoFrame)
            expected = scaled.to_ndarray(format=pixel_format, threads=1)
        else:
            expected = frame.to_ndarray(
                format=pixel_format, width=40, height=26, interpolation="AREA", threads=1
            )
        np.testing.assert_array_equal(to_pixels(frames[index], pixel_format), expected)


def test_evaluation_frames_of_an_hdr_video_are_tone_mapped(files):
    frames = read_video_frames(files["hlg"].path, [0, 3], (32, 48))
    assert sorted(frames) == [0, 3]
    assert np.abs(frames[3][4:12].astype(int) - GREY_WHITE).max() <= 2.5
