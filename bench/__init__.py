"""The benchmarks; `python -m bench` runs the published ones (see `bench/__main__.py`)."""


def percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank `q` quantile (0..1) of samples sorted ascending."""
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
