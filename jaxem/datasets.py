"""Small real datasets shipped inside the package."""

from __future__ import annotations

from importlib import resources

import numpy as np


def load_old_faithful() -> tuple[np.ndarray, list[str]]:
    """The Old Faithful geyser table: 272 eruptions of (duration, waiting time), in minutes.

    Returns:
      ``(x, feature_names)`` with ``x`` a (272, 2) float64 array.
    """
    text = resources.files("jaxem.data").joinpath("old_faithful.csv").read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    names = lines[0].split(",")
    x = np.array([[float(v) for v in ln.split(",")] for ln in lines[1:]])
    return x, names
