"""The scheme registry (Pantheon's config.yml): one fixed name, colour, marker and line style
per transmission configuration, identical in every plot of every run.

A configuration is (transmission, K, reconstruction, gamma[, epsilon]):

    full                      gamma > 0, full transmission (lossless w.r.t. the ensemble p)
    federated AR              gamma = 0, full transmission (the paper's baseline)
    topk-K <reconstruction>   gamma > 0, top-K transmission
    adaptive-K <rec> eps=E    gamma > 0, adaptive top-K (K = the cap)
    federated AR <lossy>      gamma = 0 with a lossy transmission

The colour family comes from the reconstruction (a matplotlib colormap), its shade from
log2 K (fixed: K = 16 is always the same blue), the marker from the reconstruction (or the
adaptive / federated-AR marker). A *family* is a configuration without its K: the series
drawn in plots whose x axis is K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from matplotlib import colormaps
from matplotlib.colors import to_hex


@dataclass(frozen=True)
class Style:
    """How one configuration (or family) is drawn."""

    name: str
    color: str
    marker: str
    linestyle: str = "-"
    order: float = 0.0


@dataclass(frozen=True)
class _Family:
    cmap: str
    marker: str
    order: int


#: gamma > 0, full transmission.
FULL = Style("full", "#1b1b1b", "o", "-", 0.0)
#: gamma = 0, full transmission: plain federated autoregressive decoding.
FEDERATED_AR = Style("federated AR", "#8a8a8a", "s", ":", 1.0)
#: Colour family and marker per reconstruction (top-K and adaptive).
RECONSTRUCTIONS: dict[str, _Family] = {
    "renormalize": _Family("Blues", "v", 10),
    "residual-mass": _Family("Oranges", "^", 20),
    "draft-guided": _Family("Greens", "D", 30),
}
_UNKNOWN = _Family("Greys", "h", 90)
ADAPTIVE_MARKER = "*"
LOSSY_AR_MARKER = "X"
#: log2 K mapped onto the colormap: K_MIN..K_MAX -> SHADE_LO..SHADE_HI (clipped).
K_MIN, K_MAX = 16, 1024
SHADE_LO, SHADE_HI = 0.40, 0.95
FAMILY_SHADE = 0.70


def k_shade(k: float | None) -> float:
    """Colormap position for K (fixed for every run)."""
    if k is None or not math.isfinite(k) or k <= 0:
        return FAMILY_SHADE
    t = (math.log2(k) - math.log2(K_MIN)) / (math.log2(K_MAX) - math.log2(K_MIN))
    return SHADE_LO + (SHADE_HI - SHADE_LO) * min(1.0, max(0.0, t))


def _k_text(k: float | None) -> str:
    return "?" if k is None or not math.isfinite(k) else str(int(k))


def config_style(
    transmission: str,
    k: float | None,
    reconstruction: str,
    gamma: int,
    epsilon: float | None = None,
) -> Style:
    """The registry entry of one configuration (see the module docstring)."""
    if transmission == "full":
        return FULL if gamma > 0 else FEDERATED_AR
    fam = RECONSTRUCTIONS.get(reconstruction, _UNKNOWN)
    color = to_hex(colormaps[fam.cmap](k_shade(k)))
    kk = 0.0 if k is None or not math.isfinite(k) else k
    if transmission == "adaptive":
        eps = "" if epsilon is None or not math.isfinite(epsilon) else f" eps={epsilon:g}"
        name, marker, ls, order = (
            f"adaptive-{_k_text(k)} {reconstruction}{eps}",
            ADAPTIVE_MARKER,
            "--",
            fam.order + 5 + kk * 1e-6,
        )
    else:
        name, marker, ls, order = (
            f"{transmission}-{_k_text(k)} {reconstruction}",
            fam.marker,
            "-",
            fam.order + kk * 1e-6,
        )
    if gamma == 0:
        return Style(f"federated AR {name}", color, LOSSY_AR_MARKER, ":", order + 100)
    return Style(name, color, marker, ls, order)


def family_style(transmission: str, reconstruction: str, gamma: int) -> Style:
    """The series of a K-axis plot: a configuration without its K."""
    if transmission == "full":
        return FULL if gamma > 0 else FEDERATED_AR
    fam = RECONSTRUCTIONS.get(reconstruction, _UNKNOWN)
    color = to_hex(colormaps[fam.cmap](FAMILY_SHADE))
    if transmission == "adaptive":
        st = Style(f"adaptive {reconstruction}", color, ADAPTIVE_MARKER, "--", fam.order + 5)
    else:
        st = Style(f"{transmission} {reconstruction}", color, fam.marker, "-", fam.order)
    if gamma == 0:
        return Style(f"federated AR {st.name}", color, LOSSY_AR_MARKER, ":", st.order + 100)
    return st
