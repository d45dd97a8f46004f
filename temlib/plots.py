"""Figures shared by the notebooks: phase and IPF maps, virtual images, pattern galleries.

Every function returns the matplotlib ``Figure`` (or draws into given axes) and
never calls ``plt.show()``, so notebooks embed them and scripts save them.
"""

from __future__ import annotations

import numpy as np


def _plt():
    import matplotlib.pyplot as plt

    return plt


def phase_rgb(xmap) -> np.ndarray:
    """(rows, cols, 3) RGB image of the phases of an orix ``CrystalMap`` (not-indexed black)."""
    from matplotlib.colors import to_rgb

    rgb = np.zeros((xmap.size, 3))
    for pid, phase in xmap.phases:
        m = xmap.phase_id == pid
        if pid >= 0:
            rgb[m] = to_rgb(phase.color)
    return rgb.reshape(*xmap.shape, 3)


def ipf_rgb(xmap, direction=(0, 0, 1)) -> np.ndarray:
    """(rows, cols, 3) inverse-pole-figure colours of each pixel's orientation along ``direction``.

    Each phase is coloured with the IPF key of its own point group (orix ``IPFColorKeyTSL``);
    ``direction`` is a sample direction (default the beam, z). Maps holding several
    solutions per point are coloured by the first (the best).
    """
    from orix.plot import IPFColorKeyTSL
    from orix.quaternion import Orientation
    from orix.vector import Vector3d

    rgb = np.zeros((xmap.size, 3))
    for pid, phase in xmap.phases:
        if pid < 0:
            continue
        m = xmap.phase_id == pid
        if not m.any():
            continue
        key = IPFColorKeyTSL(phase.point_group, direction=Vector3d(direction))
        rot = xmap.rotations[m]
        if rot.ndim > 1:  # n best solutions per point: the best
            rot = rot[:, 0]
        o = Orientation(rot, symmetry=phase.point_group)
        rgb[m] = key.orientation2color(o)
    return rgb.reshape(*xmap.shape, 3)


def phase_ipf_figure(xmaps: dict, direction=(0, 0, 1), title: str = ""):
    """Phase map (top) and IPF-z map (bottom) for each named ``CrystalMap``, side by side."""
    from matplotlib.patches import Patch

    plt = _plt()
    n = len(xmaps)
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n, 7.2), squeeze=False)
    for k, (name, xm) in enumerate(xmaps.items()):
        axes[0, k].imshow(phase_rgb(xm), interpolation="nearest")
        axes[0, k].set_title(f"{name}: phases")
        axes[1, k].imshow(ipf_rgb(xm, direction), interpolation="nearest")
        axes[1, k].set_title(f"{name}: IPF-Z")
        for ax in axes[:, k]:
            ax.set_axis_off()
    seen = {}
    for xm in xmaps.values():
        seen.update({ph.name: ph.color for pid, ph in xm.phases if pid >= 0})
    handles = [Patch(color=c, label=n) for n, c in seen.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def ipf_key_figure(phases):
    """The IPF colour keys (beam direction) of ``phases`` (orix Phase objects), one panel each."""
    import orix.plot  # noqa: F401  (registers the "ipf" projection)

    plt = _plt()
    fig = plt.figure(figsize=(3.2 * len(phases), 3))
    for k, ph in enumerate(phases):
        ax = fig.add_subplot(1, len(phases), k + 1, projection="ipf", symmetry=ph.point_group)
        ax.plot_ipf_color_key()
        ax.set_title(f"{ph.name} ({ph.point_group.name})", pad=20)
    fig.tight_layout()
    return fig


def virtual_images(signal, inner: float = 4.0, outer: tuple[float, float] = (10.0, 60.0)):
    """Virtual bright-field and annular dark-field images of a (lazy) 4D map.

    Parameters
    ----------
    signal
        (rows, cols | ky, kx) signal from :func:`temlib.io.load_map`.
    inner
        Bright-field disk radius (px) about the direct beam.
    outer
        Dark-field annulus (inner, outer) radii (px).

    Returns
    -------
    (vbf, vdf) two (rows, cols) float arrays.
    """
    data = signal.data
    h, w, ky, kx = data.shape
    rr, cc = np.mgrid[0:ky, 0:kx]
    d2 = (rr - ky / 2) ** 2 + (
        cc - kx / 2
    ) ** 2  # about the pattern middle (the beam drifts a few px)
    bf = (d2 <= inner**2).astype(np.float32)
    df = ((d2 >= outer[0] ** 2) & (d2 <= outer[1] ** 2)).astype(np.float32)
    vbf = np.tensordot(data, bf, axes=([2, 3], [0, 1]))
    vdf = np.tensordot(data, df, axes=([2, 3], [0, 1]))
    if hasattr(vbf, "compute"):
        import dask

        vbf, vdf = dask.compute(vbf, vdf)
    return np.asarray(vbf, float), np.asarray(vdf, float)


def virtual_figure(signal, title: str = ""):
    """Virtual bright-field and dark-field images side by side."""
    plt = _plt()
    vbf, vdf = virtual_images(signal)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, img, name in zip(
        axes, (vbf, vdf), ("virtual bright field", "virtual annular dark field"), strict=True
    ):
        ax.imshow(img, cmap="gray")
        ax.set_title(name)
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def gallery(
    patterns, titles=None, ncols: int = 6, gamma: float = 0.5, size: float = 2.2, suptitle: str = ""
):
    """Grid of diffraction patterns shown with an intensity gamma (spots and halo both visible)."""
    plt = _plt()
    patterns = np.asarray(patterns, dtype=float)
    n = len(patterns)
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size * ncols, size * nrows + 0.3), squeeze=False
    )
    for ax in axes.ravel():
        ax.set_axis_off()
    for k in range(n):
        ax = axes.ravel()[k]
        p = np.clip(patterns[k], 0, None)
        ax.imshow(p**gamma, cmap="inferno", interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[k], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def spot_overlay(
    ax,
    pattern: np.ndarray,
    calibration: float,
    phase,
    solutions: dict,
    kv: float = 200.0,
    max_excitation_error: float = 0.03,
    center=None,
    g_max: float | None = None,
) -> None:
    """Draw a pattern (high-passed so weak spots show) with the kinematic spots of orientations.

    Parameters
    ----------
    ax
        Matplotlib axes.
    pattern
        (M, N) raw pattern.
    calibration
        1/Å per px.
    phase
        orix ``Phase`` (with structure) the solutions belong to.
    solutions
        ``{label: (4,) quaternion}`` (sample -> crystal), each drawn with its own marker.
    kv, max_excitation_error
        Beam energy and relrod half-width (1/Å) of the drawn spots.
    center
        (row, col) of the direct beam; default found (:func:`temlib.io.find_direct_beam`).
    g_max
        Largest |g| drawn (1/Å); default the pattern's half-width.
    """
    from orix.quaternion import Rotation
    from scipy import ndimage as ndi

    from . import io, simulate

    p = np.asarray(pattern, float)
    if center is None:
        center = io.find_direct_beam(p[None].astype(np.float32))[0]
    hp = ndi.gaussian_filter(p, 1.0) - ndi.gaussian_filter(p, 4.0)
    ax.imshow(np.clip(hp, 0, np.percentile(hp, 99.7)), cmap="gray", interpolation="nearest")
    g_max = g_max or 0.5 * min(p.shape) * calibration
    refl = simulate.reflections(phase, g_max=g_max)
    markers = ["o", "s", "D", "^"]
    colors = ["tab:red", "tab:cyan", "tab:orange", "tab:green"]
    for k, (label, q) in enumerate(solutions.items()):
        xy, _, idx = simulate.kinematic_spots(
            refl,
            Rotation(np.asarray(q, float).reshape(1, 4)),
            kv=kv,
            max_excitation_error=max_excitation_error,
        )
        keep = idx[0] >= 0
        ax.scatter(
            center[1] + xy[0, keep, 0] / calibration,
            center[0] + xy[0, keep, 1] / calibration,
            s=50,
            facecolors="none",
            edgecolors=colors[k % 4],
            marker=markers[k % 4],
            lw=1.0,
            label=label,
        )
    ax.plot(center[1], center[0], "+", color="yellow")
    ax.set_xlim(0, p.shape[1] - 1)
    ax.set_ylim(p.shape[0] - 1, 0)
    ax.set_axis_off()


def error_cdf(errors: dict, max_deg: float = 20.0, ax=None, title: str = ""):
    """Share of pixels indexed within each disorientation, one line per method.

    Parameters
    ----------
    errors
        ``{method: (N,) disorientations in deg}``; NaN (a wrong phase, nothing indexed)
        counts as never within, so each curve ends at the method's share of correct pixels.
    max_deg
        Right end of the angle axis (deg).
    """
    plt = _plt()
    if not errors:
        raise ValueError("No errors to plot; expected {method: disorientations in deg}")
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
    else:
        fig = ax.figure
    x = np.linspace(0.0, float(max_deg), 401)
    for name, e in errors.items():
        e = np.asarray(e, float).ravel()
        if e.size == 0:
            continue
        within = np.sort(np.where(np.isfinite(e), e, np.inf))
        ax.plot(x, np.searchsorted(within, x, side="right") / e.size, label=f"{name} (n={e.size})")
    for a in (0.5, 2.0):
        ax.axvline(a, color="0.6", lw=0.8, ls=":")
    ax.set(
        xlim=(0, max_deg),
        ylim=(0, 1),
        xlabel="disorientation (deg, modulo the beam flip)",
        ylabel="share of pixels within",
        title=title,
    )
    ax.legend(fontsize=8, loc="lower right")
    return fig
