import numpy as np
import pytest
from orix.quaternion import Rotation

from temlib import simulate


def test_wavelength_200kv():
    assert simulate.wavelength(200) == pytest.approx(0.025079, abs=2e-6)
    with pytest.raises(ValueError, match="not positive"):
        simulate.wavelength(0)


def test_ferrite_001_zone_axis_spots():
    """Beam along [001] of BCC iron: four {110} at 45 deg and four {200} on the axes, no {100}."""
    refl = simulate.reflections("ferrite", g_max=0.8)
    xy, inten, idx = simulate.kinematic_spots(refl, Rotation.identity(), max_excitation_error=0.02)
    k = inten[0] > 1e-3 * inten[0].max()
    hkl = refl.hkl[idx[0][k]]
    r = np.hypot(*xy[0][k].T)
    a = 2.8665
    assert sorted(map(tuple, hkl)) == sorted(
        [
            (1, 1, 0),
            (-1, -1, 0),
            (1, -1, 0),
            (-1, 1, 0),
            (2, 0, 0),
            (-2, 0, 0),
            (0, 2, 0),
            (0, -2, 0),
        ]
    )
    np.testing.assert_allclose(np.sort(r), [np.sqrt(2) / a] * 4 + [2 / a] * 4, rtol=1e-6)
    assert not any(abs(h).sum() == 1 for h in hkl)  # (100) is extinct in BCC


@pytest.mark.parametrize("name", ["ferrite", "NbC", "cementite"])
def test_batched_spots_match_diffsims(name):
    rows = simulate.compare_with_diffsims([name], n=5, rng=3)
    assert rows[0]["same spot count"] == "5/5"
    assert rows[0]["max position difference (1/Å)"] < 1e-5
    assert rows[0]["max relative intensity difference"] < 1e-4


def test_centrosymmetric_beam_flip_same_pattern():
    refl = simulate.reflections("cementite", g_max=1.2)
    r = Rotation.from_axes_angles([1, 2, 3], 0.7)
    flipped = r * Rotation.from_axes_angles([0, 0, 1], np.pi)
    a = simulate.kinematic_spots(refl, r)
    b = simulate.kinematic_spots(refl, flipped)
    pa = {tuple(np.round(p, 5)) for p in a[0][0][a[1][0] > 0]}
    pb = {tuple(np.round(-p, 5)) for p in b[0][0][b[1][0] > 0]}
    assert pa == pb


def test_template_library_cache_roundtrip(tmp_path):
    lib = simulate.template_library("NbC", "reduced", resolution=6, cache=tmp_path)
    assert lib.seconds > 0 and lib.size > 10
    again = simulate.template_library("NbC", "reduced", resolution=6, cache=tmp_path)
    assert again.seconds == 0
    np.testing.assert_array_equal(lib.xy, again.xy)
    np.testing.assert_allclose(lib.rotations.data, again.rotations.data)
    assert len(list(tmp_path.glob("*.npz"))) == 1


def test_template_library_bad_arguments():
    with pytest.raises(ValueError, match="Unknown library kind 'half'"):
        simulate.template_library("NbC", "half")
    with pytest.raises(ValueError, match="Resolution 0"):
        simulate.template_library("NbC", resolution=0)


def test_zone_axis_label_and_spread():
    lib = simulate.template_library("ferrite", "reduced", resolution=5, cache=False)
    labels = {simulate.zone_axis_label(lib.phase, d) for d in simulate.beam_directions(lib)}
    assert {"[0 0 1]", "[1 1 1]"} <= labels
    assert len(set(simulate.spread_templates(lib, 6))) == 6
