"""The sampled images as the panel shows them: side by side, enlarged, and their difference."""
from __future__ import annotations

import numpy as np

SCALE = 6          # 32x32 samples, enlarged (nearest) so their pixels stay crisp
MAX_GAIN = 64


def side_by_side(images: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] uint8 images in one row, each pixel a SCALE x SCALE square."""
    row = np.concatenate(list(images), axis=1)
    return np.kron(row, np.ones((SCALE, SCALE, 1), dtype=np.uint8))


def difference_gain(uncached: np.ndarray, cached: np.ndarray) -> int:
    """A power of two that makes the bulk of |uncached - cached| visible: a difference of 3/255 is
    invisible as it is. The 99th percentile is brought near full scale (at most x64), so a few outlier
    pixels do not hide the rest. Powers of two keep the scale easy to read in the label."""
    diff = np.abs(uncached.astype(np.int16) - cached.astype(np.int16))
    high = float(np.percentile(diff, 99)) if diff.size else 0.0
    if high <= 0:
        return 1
    return int(min(MAX_GAIN, 2 ** max(0, int(np.floor(np.log2(255 / high))))))


def difference(uncached: np.ndarray, cached: np.ndarray) -> tuple[np.ndarray, int]:
    """|uncached - cached| per pixel and channel, times the gain, clipped to 255; and the gain."""
    gain = difference_gain(uncached, cached)
    diff = np.abs(uncached.astype(np.int16) - cached.astype(np.int16)) * gain
    return np.clip(diff, 0, 255).astype(np.uint8), gain
