"""Procedural albedo textures of the synthetic room's surfaces, and their seeded draw."""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["ProceduralTexture"]


@dataclass(frozen=True, eq=False)
class ProceduralTexture:
    """A band-limited procedural albedo: two colours mixed by a stripe or soft-checker pattern laid out
    in surface coordinates, perturbed by smooth noise (a sum of plane waves in 3D).

    The pattern is deliberately smooth at the pixel scale (sinusoids, tanh-softened checkers): it carries
    plenty of detail for PSNR and features, while resampling (downscale, undistortion) stays faithful.
    """

    colour_a: np.ndarray  # [3]
    colour_b: np.ndarray  # [3]
    pattern: str  # "stripes" | "checker"
    wavelength: float  # metres per pattern period
    angle: float  # stripe direction in the (u, v) surface plane, radians
    phases: np.ndarray  # [2]
    wave_vectors: np.ndarray  # [K, 3] noise spatial frequencies, cycles per metre
    wave_phases: np.ndarray  # [K]
    tint: np.ndarray  # [3] colour direction of the noise

    def albedo(self, uv: np.ndarray, points: np.ndarray) -> np.ndarray:
        """Albedo `[N, 3]` in [0, 1] at surface coordinates `uv [N, 2]` (metres) and points `[N, 3]`."""
        omega = 2.0 * np.pi / self.wavelength
        if self.pattern == "stripes":
            coordinate = math.cos(self.angle) * uv[:, 0] + math.sin(self.angle) * uv[:, 1]
            mix = 0.5 + 0.5 * np.sin(omega * coordinate + self.phases[0])
        else:
            product = np.sin(omega * uv[:, 0] + self.phases[0]) * np.sin(omega * uv[:, 1] + self.phases[1])
            mix = 0.5 + 0.5 * np.tanh(2.5 * product)
        noise = np.sin(2.0 * np.pi * points @ self.wave_vectors.T + self.wave_phases).mean(axis=1)
        mix = np.clip(mix + 0.3 * noise, 0.0, 1.0)[:, None]
        colour = self.colour_a * (1.0 - mix) + self.colour_b * mix
        colour = colour * (1.0 + 0.15 * noise[:, None]) + 0.03 * noise[:, None] * self.tint
        return np.clip(colour, 0.0, 1.0)


def _random_texture(
    rng: np.random.Generator, hue: float, pattern: str, angle: float | None = None
) -> ProceduralTexture:
    saturation, value = rng.uniform(0.35, 0.65), rng.uniform(0.6, 0.9)
    colour_a = np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value))
    # The second colour is a darker shade of a close hue: the pattern is mostly luminance, as in real
    # textures, so chroma-subsampled JPEGs keep it, and every surface stays recognisable by its hue.
    colour_b = np.array(
        colorsys.hsv_to_rgb(
            (hue + rng.uniform(0.0, 0.04)) % 1.0, min(1.0, saturation + 0.1), value * rng.uniform(0.35, 0.55)
        )
    )
    num_waves = 6
    directions = rng.normal(size=(num_waves, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelengths = rng.uniform(0.25, 1.2, size=num_waves)
    return ProceduralTexture(
        colour_a=colour_a,
        colour_b=colour_b,
        pattern=pattern,
        wavelength=float(rng.uniform(0.3, 0.6)),
        angle=float(rng.uniform(0, np.pi) if angle is None else angle),
        phases=rng.uniform(0, 2 * np.pi, size=2),
        wave_vectors=directions / wavelengths[:, None],
        wave_phases=rng.uniform(0, 2 * np.pi, size=num_waves),
        tint=rng.normal(size=3),
    )
