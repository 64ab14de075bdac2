"""sanitize: find backdoor-poisoned samples in an image-classification dataset.

Library first: ``sanitize.run(data, method="advrbd", out=..., **options)`` does
what ``sanitize run`` does and returns a :class:`sanitize.pipeline.RunResult`;
``sanitize.poison(data, attack=..., rate=..., target=..., out=...)`` does what
``sanitize poison`` does and returns the ground truth (truth.json's contents).
Both raise :class:`InputError` for anything the user can fix (the CLI's exit code 2);
``run`` raises :class:`OnnxCheckError` when the exported model disagrees with torch
(exit code 3). Importing the package does not import torch.
"""
__version__ = "0.1.0"  # before the import below: the manifest module reads it

from sanitize.formats.records import InputError, OnnxCheckError  # noqa: E402  (no torch: the package stays light)

__all__ = ["run", "poison", "InputError", "OnnxCheckError"]


def __getattr__(name: str):
    # sanitize.run is sanitize.pipeline.run itself (its whole signature and docstring for help() and
    # IDEs that run code), loaded on first use: the pipeline imports torch.
    if name == "run":
        from sanitize.pipeline import run

        return run
    raise AttributeError(f"module 'sanitize' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "run"})


def poison(data, *, attack: str, rate: float, target=0, out, seed: int = 0, format: str | None = None,
           overwrite: bool = False, **params) -> dict:
    """Write a poisoned copy of ``data`` to ``out`` (see :func:`sanitize.attacks.poison_dataset`).

    ``format``: "webdataset" or "imagefolder" (default: the input's), as ``--format``; ``params``
    are the attack's parameters, as ``--set``."""
    from sanitize.attacks import poison_dataset

    if "fmt" in params:  # poison_dataset's own name for it
        raise InputError("sanitize.poison takes the output format as format=..., not fmt=...")
    return poison_dataset(data, attack=attack, rate=rate, target=target, out=out, seed=seed, fmt=format,
                          overwrite=overwrite, **params)
