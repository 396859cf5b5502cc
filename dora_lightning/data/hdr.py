"""HDR video (PQ or HLG transfer, BT.2020 primaries) tone-mapped to 8-bit SDR sRGB frames, in numpy.

The decoder's RGB conversion (swscale, with the file's colour matrix and range) gives non-linear HDR signal values as
16-bit codes; :class:`ToneMap` turns them into the frames an SDR video of the same scene would hold:

1. signal to display light, relative to the HDR reference white of 203 cd/m2 (Report ITU-R BT.2408), which becomes
   SDR 1.0: PQ through its EOTF (SMPTE ST 2084); HLG through its inverse OETF and the OOTF of a 1000 cd/m2 display
   (system gamma 1.2 on the BT.2020 luminance, Rec. ITU-R BT.2100);
2. BT.2020 primaries to BT.709 (a 3x3 matrix on linear light, from the primaries' chromaticities), negative (out of
   gamut) values clipped to 0;
3. highlights compressed on the largest channel (which keeps hue and saturation): identity up to
   :data:`KNEE`, then an extended Reinhard curve that reaches SDR 1.0 at :data:`PEAK`; reference white lands at
   0.875 (sRGB code 240.5);
4. the sRGB encoding (IEC 61966-2-1) to uint8, as the probes' and evaluations' images are.

The per-channel steps are lookup tables (65,536 entries in, 4,096 linear levels out), so a frame costs a few ms.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = [
    "BT709_PRIMARIES",
    "BT2020_PRIMARIES",
    "HLG",
    "KNEE",
    "P3_D65_PRIMARIES",
    "PEAK",
    "PQ",
    "REFERENCE_WHITE",
    "UNSPECIFIED",
    "UNSPECIFIED_PRIMARIES",
    "ToneMap",
    "highlight_curve",
    "hlg_inverse_oetf",
    "is_hdr",
    "pq_eotf",
    "primaries_matrix",
    "srgb_encode",
    "tone_map_for",
]

# FFmpeg's AVColorTransferCharacteristic and AVColorPrimaries values (PyAV's ColorTrc / ColorPrimaries)
PQ, HLG = 16, 18
UNSPECIFIED = 2  # FFmpeg's "unspecified" transfer, primaries and matrix alike
BT709_PRIMARIES, UNSPECIFIED_PRIMARIES, BT2020_PRIMARIES, P3_D65_PRIMARIES = 1, UNSPECIFIED, 9, 12

REFERENCE_WHITE = 203.0  # cd/m2: HDR reference (diffuse) white, BT.2408; SDR 1.0
HLG_PEAK = 1000.0  # cd/m2: the HLG display the OOTF is taken for (nominal peak); also the peak assumed for PQ
HLG_GAMMA = 1.2  # HLG system gamma at 1000 cd/m2
KNEE = 0.75  # SDR-relative linear light below which the highlight curve is the identity
PEAK = HLG_PEAK / REFERENCE_WHITE  # HDR light (4.93 x reference white) that the curve maps to SDR 1.0
OUTPUT_LEVELS = 4096  # linear-light levels of the output table (sRGB's toe keeps each step under one code)

# CIE xy of red, green, blue and the white point
_CHROMATICITIES = {
    BT709_PRIMARIES: ((0.640, 0.330), (0.300, 0.600), (0.150, 0.060), (0.3127, 0.3290)),
    BT2020_PRIMARIES: ((0.708, 0.292), (0.170, 0.797), (0.131, 0.046), (0.3127, 0.3290)),
    P3_D65_PRIMARIES: ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060), (0.3127, 0.3290)),
}

_PQ_M1, _PQ_M2 = 2610 / 16384, 2523 / 4096 * 128
_PQ_C1, _PQ_C2, _PQ_C3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
_HLG_A = 0.17883277
_HLG_B = 1 - 4 * _HLG_A
_HLG_C = 0.5 - _HLG_A * np.log(4 * _HLG_A)


def is_hdr(transfer: int) -> bool:
    """Whether FFmpeg's transfer characteristic ``transfer`` is an HDR one this module maps (PQ or HLG); any other,
    unspecified included, is SDR."""
    return transfer in (PQ, HLG)


def pq_eotf(signal: np.ndarray) -> np.ndarray:
    """PQ (SMPTE ST 2084) signal in [0, 1] to the absolute display luminance it encodes, in cd/m2 (0 to 10,000)."""
    power = np.power(np.clip(np.asarray(signal, dtype=np.float64), 0.0, 1.0), 1 / _PQ_M2)
    ratio = np.maximum(power - _PQ_C1, 0.0) / (_PQ_C2 - _PQ_C3 * power)
    return 10000.0 * np.power(ratio, 1 / _PQ_M1)


def hlg_inverse_oetf(signal: np.ndarray) -> np.ndarray:
    """HLG (ARIB STD-B67, BT.2100) signal in [0, 1] to normalised scene light in [0, 1]."""
    e = np.clip(np.asarray(signal, dtype=np.float64), 0.0, 1.0)
    upper = (np.exp((np.maximum(e, 0.5) - _HLG_C) / _HLG_A) + _HLG_B) / 12.0
    return np.where(e <= 0.5, e * e / 3.0, upper)


def primaries_matrix(source: int, target: int = BT709_PRIMARIES) -> np.ndarray:
    """The 3x3 matrix taking linear RGB with FFmpeg primaries ``source`` to linear RGB with ``target`` (same white
    point); the identity when they are equal. BT.2020 to BT.709 is BT.2087's matrix."""
    return np.linalg.solve(_rgb_to_xyz(target), _rgb_to_xyz(source))


def _rgb_to_xyz(primaries: int) -> np.ndarray:
    *colours, white = _CHROMATICITIES[primaries]
    # columns: the XYZ of red, green and blue at Y = 1, then scaled so that R = G = B = 1 is the white point
    xyz = np.array([[x / y, 1.0, (1 - x - y) / y] for x, y in colours]).T
    wx, wy = white
    scale = np.linalg.solve(xyz, np.array([wx / wy, 1.0, (1 - wx - wy) / wy]))
    return xyz * scale


def highlight_curve(light: np.ndarray, knee: float = KNEE, peak: float = PEAK) -> np.ndarray:
    """SDR-relative linear light (1.0: reference white) compressed into [0, 1]: the identity up to ``knee``, then an
    extended Reinhard curve (slope 1 at the knee, smooth) that reaches 1.0 at ``peak``; brighter values give 1.0."""
    light = np.asarray(light, dtype=np.float32)
    span = np.float32(1.0 - knee)
    t = np.maximum(light - np.float32(knee), 0.0) / span
    t_peak = np.float32((peak - knee) / (1.0 - knee))
    compressed = np.float32(knee) + span * t * (1.0 + t / (t_peak * t_peak)) / (1.0 + t)
    return np.minimum(np.where(light <= knee, light, compressed), np.float32(1.0))


def srgb_encode(linear: np.ndarray) -> np.ndarray:
    """Linear light in [0, 1] to the sRGB (IEC 61966-2-1) signal in [0, 1]."""
    x = np.clip(np.asarray(linear, dtype=np.float64), 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)


class ToneMap:
    """Tone mapping of one HDR transfer and set of primaries, built once (its tables take about 1 ms) and applied
    to every frame: ``tone_map(codes)`` maps an (H, W, 3) uint16 array of non-linear RGB signal codes (swscale's
    ``rgb48le``: 0 to 65535 for signal 0 to 1) to an (H, W, 3) uint8 sRGB/BT.709 array (``channels=4``: with an
    alpha channel of 255)."""

    def __init__(self, transfer: int, primaries: int = BT2020_PRIMARIES) -> None:
        if not is_hdr(transfer):
            raise ValueError(f"transfer {transfer} is not PQ ({PQ}) or HLG ({HLG})")
        self.transfer = transfer
        self.primaries = primaries if primaries in _CHROMATICITIES else BT2020_PRIMARIES
        signal = np.arange(65536, dtype=np.float64) / 65535
        if transfer == PQ:  # display light, relative to reference white
            self._linear = (pq_eotf(signal) / REFERENCE_WHITE).astype(np.float32)
        else:  # scene light; the OOTF (which needs each pixel's luminance) is applied per frame
            self._linear = hlg_inverse_oetf(signal).astype(np.float32)
            # the OOTF's gain on a pixel, by its scene luminance (0 to 1 in 65,536 steps), relative to reference white
            self._ootf_gain = (HLG_PEAK / REFERENCE_WHITE * signal ** (HLG_GAMMA - 1)).astype(np.float32)
        self._matrix = primaries_matrix(self.primaries).astype(np.float32)
        self._luminance = _rgb_to_xyz(self.primaries)[1].astype(np.float32)  # BT.2020: 0.2627, 0.6780, 0.0593
        levels = np.arange(OUTPUT_LEVELS, dtype=np.float64) / (OUTPUT_LEVELS - 1)
        self._encode = np.round(srgb_encode(levels) * 255).astype(np.uint8)

    def display_light(self, codes: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint16 signal codes to linear BT.709 display light relative to reference white (1.0) as (3, H * W)
        planes, negative values clipped; highlights not yet compressed."""
        light = np.take(
            self._linear, codes.reshape(-1, 3).T
        )  # planes: every later step reads contiguous memory
        if self.transfer == HLG:
            luminance = _weighted_sum(light, self._luminance)  # scene luminance in [0, 1]
            light *= np.take(
                self._ootf_gain, (luminance * np.float32(65535) + np.float32(0.5)).astype(np.uint16)
            )
        if self.primaries != BT709_PRIMARIES:
            light = np.stack([_weighted_sum(light, row) for row in self._matrix])
        return np.maximum(light, np.float32(0.0), out=light)

    def __call__(self, codes: np.ndarray, channels: int = 3) -> np.ndarray:
        if codes.dtype != np.uint16 or codes.ndim != 3 or codes.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint16 array, got {codes.dtype} {codes.shape}")
        light = self.display_light(codes)
        brightest = np.maximum(np.maximum(light[0], light[1]), light[2])
        light *= highlight_curve(brightest) / np.maximum(brightest, np.float32(1e-6))
        index = (light * np.float32(OUTPUT_LEVELS - 1) + np.float32(0.5)).astype(np.uint16)
        out = np.empty((*codes.shape[:2], channels), dtype=np.uint8)
        out[..., :3] = np.take(self._encode, index).T.reshape(out.shape[0], out.shape[1], 3)
        if channels == 4:
            out[..., 3] = 255
        return out


def _weighted_sum(planes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``weights @ planes`` for (3, N) float32 planes, elementwise: numpy's matrix product would call OpenBLAS, whose
    threads (one per core, spinning) made a frame ten times slower on a busy machine."""
    total = planes[0] * weights[0]
    total += planes[1] * weights[1]
    total += planes[2] * weights[2]
    return total


@lru_cache(maxsize=8)
def tone_map_for(transfer: int, primaries: int) -> ToneMap | None:
    """The (shared) :class:`ToneMap` for a stream's FFmpeg colour tags, or None for SDR (any transfer but PQ and
    HLG). HDR with unspecified or unknown primaries is taken as BT.2020, as BT.2100 defines it."""
    return ToneMap(transfer, primaries) if is_hdr(transfer) else None
