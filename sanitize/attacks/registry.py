"""The one registry of attacks, and ``make_attack`` to build one by name from (CLI) values."""
from __future__ import annotations

import dataclasses

from sanitize.attacks.adaptive import AdaptiveBlend, AdaptivePatch
from sanitize.attacks.badnets import BadNets
from sanitize.attacks.base import Attack
from sanitize.attacks.blend import Blend
from sanitize.attacks.label_consistent import LabelConsistent
from sanitize.attacks.physicalba import PhysicalBA
from sanitize.attacks.sig import SIG
from sanitize.attacks.tact import TaCT
from sanitize.attacks.wanet import WaNet
from sanitize.formats.records import InputError
from sanitize.methods import coerce

REGISTRY: dict[str, type[Attack]] = {attack.name: attack for attack in (
    BadNets, Blend, SIG, WaNet, PhysicalBA, TaCT, AdaptiveBlend, AdaptivePatch, LabelConsistent)}


def make_attack(name: str, **params) -> Attack:
    """The attack ``name`` with ``params`` over its defaults. Values may be strings (from a
    command line); they are converted to the type of the default."""
    if name not in REGISTRY:
        raise InputError(f"unknown attack {name!r}; choose one of {', '.join(REGISTRY)}")
    attack_class = REGISTRY[name]
    defaults = {f.name: f.default for f in dataclasses.fields(attack_class)}
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise InputError(f"unknown parameter(s) for {name}: {', '.join(unknown)}; "
                         f"valid: {', '.join(defaults)}")
    values = {key: _coerce(name, key, value, defaults[key]) for key, value in params.items()}
    if values.get("pattern_seed", 0) < 0:  # numpy's generators take no negative seed
        raise InputError(f"{name} parameter pattern_seed must be at least 0, got {values['pattern_seed']}")
    return attack_class(**values)


def _coerce(attack: str, key: str, value, default):
    """``value`` as the type of ``default``; a tuple accepts a list or a comma-separated string."""
    item_kind = type(default[0]) if isinstance(default, tuple) and default else int
    return coerce(f"{attack} parameter {key}", value, type(default), item_kind)
