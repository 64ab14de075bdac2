"""sanitize: find backdoor-poisoned samples in an image-classification dataset.

Library first: ``sanitize.run(data, method="advrbd", out=..., **options)`` does
what ``sanitize run`` does and returns a :class:`sanitize.pipeline.RunResult`.
"""
__version__ = "0.1.0"


def run(data, method="advrbd", out=None, **options):
    """Sanitize ``data`` (an ImageFolder root or WebDataset shards) into ``out``."""
    from sanitize.pipeline import run as _run

    return _run(data, method=method, out=out, **options)
