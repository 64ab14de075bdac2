"""sanitize: find backdoor-poisoned samples in an image-classification dataset.

Library first: ``sanitize.run(data, method="advrbd", out=..., **options)`` does
what ``sanitize run`` does and returns a :class:`sanitize.pipeline.RunResult`;
``sanitize.poison(data, attack=..., rate=..., target=..., out=...)`` does what
``sanitize poison`` does and returns the ground truth (truth.json's contents).
"""
__version__ = "0.1.0"


def run(data, method="advrbd", out=None, **options):
    """Sanitize ``data`` (an ImageFolder root or WebDataset shards) into ``out``."""
    from sanitize.pipeline import run as _run

    return _run(data, method=method, out=out, **options)


def poison(data, *, attack: str, rate: float, target=0, out, seed: int = 0, format: str | None = None,
           overwrite: bool = False, **params) -> dict:
    """Write a poisoned copy of ``data`` to ``out`` (see :func:`sanitize.attacks.poison_dataset`).

    ``format``: "webdataset" or "imagefolder" (default: the input's), as ``--format``; ``params``
    are the attack's parameters, as ``--set``."""
    from sanitize.attacks import poison_dataset

    return poison_dataset(data, attack=attack, rate=rate, target=target, out=out, seed=seed, fmt=format,
                          overwrite=overwrite, **params)
