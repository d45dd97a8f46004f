"""Crystal phases of the steel (ferrite, NbC, cementite) and MgO, as orix ``Phase`` objects.

Each phase carries a full diffpy ``Structure`` (every atom of the unit cell), so
diffsims computes structure factors from it directly.

================  ===========  =====  ==========================================
name              space group  #      lattice (Å) and atoms
================  ===========  =====  ==========================================
ferrite (α-Fe)    Im-3m        229    a = 2.8665; Fe 2a
NbC               Fm-3m        225    a = 4.47; Nb 4a, C 4b (rock salt)
cementite (Fe3C)  Pnma         62     a = 5.081, b = 6.755, c = 4.515;
                                      Fe1 8d, Fe2 4c, C 4c (Wood et al. 2004)
MgO               Fm-3m        225    a = 4.212; Mg 4a, O 4b (rock salt)
================  ===========  =====  ==========================================
"""

from __future__ import annotations

import functools

import numpy as np
from diffpy.structure import Atom, Lattice, Structure
from orix.crystal_map import Phase

STEEL_PHASES = ("ferrite", "NbC", "cementite")

# Phase colours used in every phase map (orix takes matplotlib colour names).
COLORS = {"ferrite": "tab:blue", "NbC": "tab:red", "cementite": "tab:orange", "MgO": "tab:green"}

_ROCKSALT_A = [(0, 0, 0), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)]
_ROCKSALT_B = [(0.5, 0.5, 0.5), (0, 0, 0.5), (0, 0.5, 0), (0.5, 0, 0)]


def _cubic(a: float, atoms: list[tuple[str, tuple]]) -> Structure:
    return Structure(
        lattice=Lattice(a, a, a, 90, 90, 90), atoms=[Atom(el, xyz) for el, xyz in atoms]
    )


def _ferrite() -> Phase:
    s = _cubic(2.8665, [("Fe", (0, 0, 0)), ("Fe", (0.5, 0.5, 0.5))])
    return Phase(name="ferrite", space_group=229, structure=s, color=COLORS["ferrite"])


def _rocksalt(name: str, a: float, cation: str, anion: str) -> Phase:
    atoms = [(cation, p) for p in _ROCKSALT_A] + [(anion, p) for p in _ROCKSALT_B]
    return Phase(name=name, space_group=225, structure=_cubic(a, atoms), color=COLORS[name])


def _cementite() -> Phase:
    return _cementite_expanded().deepcopy()  # a copy: callers may rename or edit their phase


@functools.cache
def _cementite_expanded() -> Phase:
    """Cementite with its asymmetric unit expanded (3.2 ms; a copy of it 0.16 ms)."""
    asym = Structure(
        lattice=Lattice(5.081, 6.755, 4.515, 90, 90, 90),
        atoms=[
            Atom("Fe", (0.1845, 0.0584, 0.3330)),  # Fe1, 8d
            Atom("Fe", (0.0347, 0.25, 0.8373)),  # Fe2, 4c
            Atom("C", (0.8974, 0.25, 0.4502)),  # C, 4c
        ],
    )
    phase = Phase(name="cementite", space_group=62, structure=asym, color=COLORS["cementite"])
    return phase.expand_asymmetric_unit()


_BUILDERS = {
    "ferrite": _ferrite,
    "NbC": lambda: _rocksalt("NbC", 4.47, "Nb", "C"),
    "cementite": _cementite,
    "MgO": lambda: _rocksalt("MgO", 4.212, "Mg", "O"),
}


def phase_names() -> list[str]:
    return list(_BUILDERS)


def get_phase(name: str) -> Phase:
    """A new orix ``Phase`` with full structure for ``name`` (case-insensitive)."""
    lookup = {k.lower(): k for k in _BUILDERS}
    key = lookup.get(str(name).lower())
    if key is None:
        raise ValueError(f"Unknown phase {name!r}; expected one of {phase_names()}")
    phase = _BUILDERS[key]()
    phase.name = key
    return phase


def get_phases(names=STEEL_PHASES) -> list[Phase]:
    """Phases for a list of names (default: the three steel phases)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    return [get_phase(n) for n in names]


def atom_counts(phase: Phase) -> dict[str, int]:
    """Number of atoms of each element in the unit cell."""
    counts: dict[str, int] = {}
    for atom in phase.structure:
        counts[atom.element] = counts.get(atom.element, 0) + 1
    return counts


def d_spacing(phase: Phase, hkl) -> np.ndarray:
    """Interplanar spacing d (Å) of ``hkl`` ((3,) or (N, 3)) in ``phase``."""
    from orix.vector import Miller

    g = Miller(hkl=np.atleast_2d(hkl), phase=phase)
    return np.atleast_1d(1.0 / g.length).squeeze()
