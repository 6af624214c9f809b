"""The scheme registry (Pantheon's config.yml): one fixed name, colour, marker and line style
per transmission configuration, identical in every plot of every run.

A configuration is (transmission, K, reconstruction, gamma[, epsilon]):

    full                      gamma > 0, full transmission (lossless w.r.t. the ensemble p)
    federated AR              gamma = 0, full transmission (the paper's baseline)
    topk-K <reconstruction>   gamma > 0, top-K transmission
    adaptive-K <rec> eps=E    gamma > 0, adaptive top-K (K = the cap)
    federated AR <lossy>      gamma = 0 with a lossy transmission

The colour family comes from the reconstruction (a base hue: blue, orange, green); K moves
both the hue (within +-20 degrees of the base) and the lightness (light for small K, dark
for large K), fixed for every run: K = 16 renormalize is always the same light cyan-blue.
The marker comes from K as well (one of seven shapes per log2 K bin, 16 ... 1024 and above,
rotated per reconstruction so that two reconstructions at one K differ), so K is told apart
by marker and colour, not by shade alone. Adaptive and federated-AR configurations have
their own markers. A *family* is a configuration without its K: the series drawn in plots
whose x axis is K.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

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
    hue: float  # degrees
    marker: str  # the family's marker (K-axis plots)
    order: int
    rotation: int  # offset into K_MARKERS


#: gamma > 0, full transmission.
FULL = Style("full", "#1b1b1b", "o", "-", 0.0)
#: gamma = 0, full transmission: plain federated autoregressive decoding.
FEDERATED_AR = Style("federated AR", "#8a8a8a", "s", ":", 1.0)
#: Base hue, family marker and order per reconstruction (top-K and adaptive).
RECONSTRUCTIONS: dict[str, _Family] = {
    "renormalize": _Family(212.0, "v", 10, 0),
    "residual-mass": _Family(28.0, "^", 20, 2),
    "draft-guided": _Family(128.0, "D", 30, 4),
}
_UNKNOWN = _Family(300.0, "h", 90, 6)
ADAPTIVE_MARKER = "*"
LOSSY_AR_MARKER = "X"
#: One marker per log2 K bin (K <= 16, 32, 64, 128, 256, 512, >= 1024), rotated by the
#: reconstruction's offset.
K_MARKERS = ("v", "^", "<", ">", "D", "p", "h")
#: log2 K mapped onto [0, 1]: K_MIN..K_MAX (clipped).
K_MIN, K_MAX = 16, 1024
HUE_SPAN = 40.0  # degrees across K_MIN..K_MAX
LIGHT_HI, LIGHT_LO = 0.66, 0.28  # lightness at K_MIN, K_MAX
SATURATION = 0.72
FAMILY_T = 0.5


def k_position(k: float | None) -> float:
    """K on [0, 1]: log2 K between K_MIN and K_MAX, clipped (FAMILY_T without a K)."""
    if k is None or not math.isfinite(k) or k <= 0:
        return FAMILY_T
    t = (math.log2(k) - math.log2(K_MIN)) / (math.log2(K_MAX) - math.log2(K_MIN))
    return min(1.0, max(0.0, t))


def k_color(reconstruction: str, k: float | None) -> str:
    """The colour of (reconstruction, K): the family's hue shifted by K, lighter for small K."""
    fam = RECONSTRUCTIONS.get(reconstruction, _UNKNOWN)
    t = k_position(k)
    hue = (fam.hue + (t - 0.5) * HUE_SPAN) % 360.0
    light = LIGHT_HI + (LIGHT_LO - LIGHT_HI) * t
    return to_hex(colorsys.hls_to_rgb(hue / 360.0, light, SATURATION))


def k_marker(reconstruction: str, k: float | None) -> str:
    """The marker of (reconstruction, K): K's bin in K_MARKERS, rotated per reconstruction."""
    fam = RECONSTRUCTIONS.get(reconstruction, _UNKNOWN)
    if k is None or not math.isfinite(k) or k <= 0:
        return fam.marker
    bin_ = min(len(K_MARKERS) - 1, max(0, round(math.log2(k)) - round(math.log2(K_MIN))))
    return K_MARKERS[(bin_ + fam.rotation) % len(K_MARKERS)]


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
    color = k_color(reconstruction, k)
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
            k_marker(reconstruction, k),
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
    color = k_color(reconstruction, None)
    if transmission == "adaptive":
        st = Style(f"adaptive {reconstruction}", color, ADAPTIVE_MARKER, "--", fam.order + 5)
    else:
        st = Style(f"{transmission} {reconstruction}", color, fam.marker, "-", fam.order)
    if gamma == 0:
        return Style(f"federated AR {st.name}", color, LOSSY_AR_MARKER, ":", st.order + 100)
    return st
