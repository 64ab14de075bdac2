"""Backdoor attacks used to test the defenses, by name.

``make_attack(name, **params)`` builds one; ``attack.poison(...)`` returns a
:class:`Poisoned` copy with its ground truth; ``attack.trigger(...)`` stamps test
images to measure the attack success rate. ``poison_dataset`` does the same on a
dataset on disk and writes the copy plus truth.json.
"""
from sanitize.attacks.base import Attack, Poisoned
from sanitize.attacks.poison import poison_dataset
from sanitize.attacks.registry import REGISTRY, make_attack

__all__ = ["REGISTRY", "Attack", "Poisoned", "make_attack", "poison_dataset"]
