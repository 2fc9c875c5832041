"""Every unit conversion of the toolkit lives here.

Units are parsed from the strings people write (``"kcal/mol/Ang"``,
``"Hartree/Bohr"``, ``"eV/Å^3"``, ``"e*Ang"``, ``"GPa"``) into a value in Hartree
atomic units and a dimension vector (length, mass, time, charge, temperature).
:func:`factor` gives the multiplier between two compatible units and refuses
incompatible or unknown ones with an error that names the problem.

Constants are CODATA 2018 (SI exact values where defined). ``mol`` is the
dimensionless Avogadro number, so ``kcal/mol`` is an energy per particle.

Internal unit systems of the packages:

* ``spkmd`` works in Hartree atomic units (Bohr, Hartree, electron mass,
  ħ/E_h), like i-PI; see :data:`MD_UNITS`.
* a bundle states its own length/energy units in its metadata.
* force providers return Å / eV (:mod:`spkserve.provider`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

# --- CODATA 2018 -------------------------------------------------------------
BOHR_IN_M = 5.29177210903e-11
HARTREE_IN_J = 4.3597447222071e-18
AU_TIME_IN_S = 2.4188843265857e-17
ELECTRON_MASS_IN_KG = 9.1093837015e-31
ELEMENTARY_CHARGE_IN_C = 1.602176634e-19
AMU_IN_KG = 1.66053906660e-27
BOLTZMANN_J_PER_K = 1.380649e-23
AVOGADRO = 6.02214076e23
SPEED_OF_LIGHT_M_PER_S = 299792458.0
PLANCK_J_S = 6.62607015e-34
HBAR_J_S = PLANCK_J_S / (2 * math.pi)
VACUUM_PERMITTIVITY = 8.8541878128e-12  # F/m

_DIMS = ("length", "mass", "time", "charge", "temperature")


@dataclass(frozen=True)
class Quantity:
    """A unit: its size in atomic units and its dimension exponents (L, M, T, Q, Θ)."""

    value: float
    dims: tuple[float, float, float, float, float]

    def __mul__(self, other: "Quantity") -> "Quantity":
        return Quantity(self.value * other.value, tuple(a + b for a, b in zip(self.dims, other.dims)))

    def __truediv__(self, other: "Quantity") -> "Quantity":
        return Quantity(self.value / other.value, tuple(a - b for a, b in zip(self.dims, other.dims)))

    def __pow__(self, p: float) -> "Quantity":
        return Quantity(self.value**p, tuple(a * p for a in self.dims))

    def describe_dims(self) -> str:
        parts = [f"{n}^{e:g}" for n, e in zip(_DIMS, self.dims) if e != 0]
        return " ".join(parts) or "dimensionless"


def _q(value: float, L=0, M=0, T=0, Q=0, K=0) -> Quantity:
    return Quantity(float(value), (L, M, T, Q, K))


# base quantities in atomic units
_METER = _q(1.0 / BOHR_IN_M, L=1)
_KG = _q(1.0 / ELECTRON_MASS_IN_KG, M=1)
_SECOND = _q(1.0 / AU_TIME_IN_S, T=1)
_COULOMB = _q(1.0 / ELEMENTARY_CHARGE_IN_C, Q=1)
_KELVIN = _q(1.0, K=1)
_JOULE = _KG * _METER**2 / _SECOND**2
_ONE = _q(1.0)

_ANGSTROM = _q(1e-10 / BOHR_IN_M, L=1)
_EV = _q(ELEMENTARY_CHARGE_IN_C / HARTREE_IN_J, L=2, M=1, T=-2)
_HARTREE = _q(1.0, L=2, M=1, T=-2)
_MOL = _q(AVOGADRO)
_PASCAL = _JOULE / _METER**3
_VOLT = _JOULE / _COULOMB

UNITS: dict[str, Quantity] = {
    # length
    "bohr": _q(1.0, L=1),
    "a0": _q(1.0, L=1),
    "angstrom": _ANGSTROM,
    "ang": _ANGSTROM,
    "a": _ANGSTROM,
    "å": _ANGSTROM,
    "nm": _METER * _q(1e-9),
    "pm": _METER * _q(1e-12),
    "m": _METER,
    "cm": _METER * _q(1e-2),
    # mass
    "me": _q(1.0, M=1),
    "amu": _KG * _q(AMU_IN_KG),
    "u": _KG * _q(AMU_IN_KG),
    "da": _KG * _q(AMU_IN_KG),
    "dalton": _KG * _q(AMU_IN_KG),
    "kg": _KG,
    "g": _KG * _q(1e-3),
    # time
    "au_time": _q(1.0, T=1),
    "s": _SECOND,
    "ps": _SECOND * _q(1e-12),
    "fs": _SECOND * _q(1e-15),
    "ns": _SECOND * _q(1e-9),
    # charge
    "e": _q(1.0, Q=1),
    "c": _COULOMB,
    # temperature
    "k": _KELVIN,
    # energy
    "hartree": _HARTREE,
    "ha": _HARTREE,
    "eh": _HARTREE,
    "ev": _EV,
    "mev": _EV * _q(1e-3),
    "j": _JOULE,
    "kj": _JOULE * _q(1e3),
    "cal": _JOULE * _q(4.184),
    "kcal": _JOULE * _q(4184.0),
    "ry": _HARTREE * _q(0.5),
    "rydberg": _HARTREE * _q(0.5),
    "mol": _MOL,
    # pressure
    "pa": _PASCAL,
    "kpa": _PASCAL * _q(1e3),
    "mpa": _PASCAL * _q(1e6),
    "gpa": _PASCAL * _q(1e9),
    "bar": _PASCAL * _q(1e5),
    "kbar": _PASCAL * _q(1e8),
    "atm": _PASCAL * _q(101325.0),
    # electric
    "v": _VOLT,
    "debye": _COULOMB * _METER * _q(1e-21 / SPEED_OF_LIGHT_M_PER_S),
    "d": _COULOMB * _METER * _q(1e-21 / SPEED_OF_LIGHT_M_PER_S),
    # dimensionless
    "1": _ONE,
    "ppm": _q(1e-6),
    "": _ONE,
}

#: names whose case matters (SI prefixes M = 1e6 and m = 1e-3); looked up before
#: the case-insensitive table above
CASE_SENSITIVE_UNITS: dict[str, Quantity] = {
    "MeV": _EV * _q(1e6),
    "meV": _EV * _q(1e-3),
    "MPa": _PASCAL * _q(1e6),
    "mPa": _PASCAL * _q(1e-3),
}

_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d*)?)|(?P<name>[A-Za-zÅµ_][A-Za-zÅµ_0-9]*)|(?P<op>\*\*|[*/^()·]))")


class UnitError(ValueError):
    """A unit string cannot be parsed, or two units are incompatible."""


class _Parser:
    """Recursive-descent parser: expr := term (('*'|'/') term)*, term := atom ('^' num)?"""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        s = text.strip()
        while pos < len(s):
            m = _TOKEN.match(s, pos)
            if not m or m.end() == pos:
                raise UnitError(f"cannot parse unit {text!r}: unexpected character {s[pos]!r} at position {pos}")
            kind = m.lastgroup
            self.tokens.append((kind, m.group(kind)))
            pos = m.end()
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise UnitError(f"cannot parse unit {self.text!r}: it ends too early")
        self.i += 1
        return tok

    def parse(self) -> Quantity:
        if not self.tokens:
            return _ONE
        q = self.expr()
        if self.peek() is not None:
            raise UnitError(f"cannot parse unit {self.text!r}: unexpected {self.peek()[1]!r}")
        return q

    def expr(self) -> Quantity:
        q = self.power()
        while (tok := self.peek()) is not None and tok[1] in ("*", "/", "·"):
            self.take()
            rhs = self.power()
            q = q / rhs if tok[1] == "/" else q * rhs
        return q

    def power(self) -> Quantity:
        q = self.atom()
        tok = self.peek()
        if tok is not None and tok[1] in ("^", "**"):
            self.take()
            kind, val = self.take()
            if kind != "num":
                raise UnitError(f"cannot parse unit {self.text!r}: exponent must be a number, got {val!r}")
            q = q ** float(val)
        return q

    def _expect(self, sym: str) -> None:
        kind, val = self.take()
        if val != sym:
            raise UnitError(f"cannot parse unit {self.text!r}: expected {sym!r}, got {val!r}")

    def atom(self) -> Quantity:
        kind, val = self.take()
        if val == "(":
            q = self.expr()
            self._expect(")")
            return q
        if kind == "num":
            return _q(float(val))
        if kind == "name":
            if val in CASE_SENSITIVE_UNITS:
                return CASE_SENSITIVE_UNITS[val]
            key = val.lower()
            if key not in UNITS:
                raise UnitError(
                    f"unknown unit {val!r} in {self.text!r}; known units: {', '.join(sorted(k for k in UNITS if k))}"
                )
            return UNITS[key]
        raise UnitError(f"cannot parse unit {self.text!r}: unexpected {val!r}")


@lru_cache(maxsize=512)
def parse(unit: str) -> Quantity:
    """Parse a unit string into a :class:`Quantity` (size in atomic units)."""
    if not isinstance(unit, str):
        raise UnitError(f"a unit must be a string, got {unit!r}")
    # negative exponents: "Ang^-3" -> "(1/Ang^3)"
    text = re.sub(
        r"([A-Za-zÅµ_][A-Za-zÅµ_0-9]*)\s*(?:\^|\*\*)\s*[-−]\s*(\d+(?:\.\d*)?)", r"(1/\1^\2)", unit
    )
    return _Parser(text).parse()


def factor(from_unit: str, to_unit: str) -> float:
    """Multiplier converting a value in ``from_unit`` to ``to_unit``."""
    a, b = parse(from_unit), parse(to_unit)
    if any(abs(x - y) > 1e-12 for x, y in zip(a.dims, b.dims)):
        raise UnitError(
            f"cannot convert {from_unit!r} ({a.describe_dims()}) to {to_unit!r} ({b.describe_dims()}): dimensions differ"
        )
    return a.value / b.value


def convert(value, from_unit: str, to_unit: str):
    """Convert ``value`` (number, array or tensor) from ``from_unit`` to ``to_unit``."""
    f = factor(from_unit, to_unit)
    return value * f if f != 1.0 else value


def dimension(unit: str) -> tuple[float, ...]:
    """Dimension exponents (length, mass, time, charge, temperature) of a unit string."""
    return parse(unit).dims


def check_dimension(unit: str, like: str) -> None:
    """Raise :class:`UnitError` unless ``unit`` has the same dimension as ``like``."""
    factor(unit, like)


# --- derived constants ---------------------------------------------------------
#: Boltzmann constant in eV/K
KB_EV_PER_K = BOLTZMANN_J_PER_K / ELEMENTARY_CHARGE_IN_C
#: Boltzmann constant in Hartree/K
KB_HARTREE_PER_K = BOLTZMANN_J_PER_K / HARTREE_IN_J
#: reduced Planck constant in eV*fs
HBAR_EV_FS = HBAR_J_S / ELEMENTARY_CHARGE_IN_C * 1e15
#: the internal unit system of spkmd (Hartree atomic units, like i-PI)
MD_UNITS = {"length": "Bohr", "energy": "Hartree", "mass": "me", "time": "au_time", "charge": "e"}
