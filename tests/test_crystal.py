import numpy as np
import pytest

from temlib import crystal


@pytest.mark.parametrize(
    "name, counts, point_group, space_group",
    [
        ("ferrite", {"Fe": 2}, "m-3m", 229),
        ("NbC", {"Nb": 4, "C": 4}, "m-3m", 225),
        ("cementite", {"Fe": 12, "C": 4}, "mmm", 62),
        ("MgO", {"Mg": 4, "O": 4}, "m-3m", 225),
    ],
)
def test_structures(name, counts, point_group, space_group):
    p = crystal.get_phase(name)
    assert crystal.atom_counts(p) == counts
    assert p.point_group.name == point_group
    assert p.space_group.number == space_group


def test_get_phase_returns_independent_copies():
    a = crystal.get_phase("cementite")  # built once, handed out as copies
    a.name = "renamed"
    a.structure[0].xyz = [0.5, 0.5, 0.5]
    b = crystal.get_phase("cementite")
    assert b is not a and b.name == "cementite"
    assert not np.allclose(b.structure[0].xyz, [0.5, 0.5, 0.5])
    assert crystal.atom_counts(b) == {"Fe": 12, "C": 4}


@pytest.mark.parametrize(
    "name, hkl, d",
    [
        ("ferrite", (1, 1, 0), 2.8665 / np.sqrt(2)),
        ("ferrite", (2, 0, 0), 2.8665 / 2),
        ("NbC", (1, 1, 1), 4.47 / np.sqrt(3)),
        ("NbC", (2, 2, 0), 4.47 / np.sqrt(8)),
        ("MgO", (2, 0, 0), 2.106),
        # orthorhombic: 1/d^2 = h^2/a^2 + k^2/b^2 + l^2/c^2
        ("cementite", (1, 2, 1), 1 / np.sqrt(1 / 5.081**2 + 4 / 6.755**2 + 1 / 4.515**2)),
        ("cementite", (0, 3, 1), 1 / np.sqrt(9 / 6.755**2 + 1 / 4.515**2)),
    ],
)
def test_d_spacings(name, hkl, d):
    assert crystal.d_spacing(crystal.get_phase(name), hkl) == pytest.approx(d, rel=1e-6)


def test_cementite_atoms_are_distinct_and_in_cell():
    xyz = np.array([a.xyz for a in crystal.get_phase("cementite").structure]) % 1.0
    assert len(np.unique(np.round(xyz, 4), axis=0)) == 16


def test_unknown_phase_message():
    with pytest.raises(
        ValueError, match=r"Unknown phase 'austenite'; expected one of \['ferrite', 'NbC'"
    ):
        crystal.get_phase("austenite")


def test_case_insensitive_and_list():
    assert [p.name for p in crystal.get_phases("FERRITE, nbc")] == ["ferrite", "NbC"]
