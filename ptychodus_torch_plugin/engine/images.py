"""PNG images of a complex object (amplitude and phase), for the CLI, the demo and the docs.

matplotlib is imported on first use with the non-interactive Agg backend, so importing the
engine stays light and never needs a display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_write_path


def save_object_images(
    obj: np.ndarray,
    output_dir: str | Path,
    *,
    mask: np.ndarray | None = None,
    prefix: str = "object",
    title: str = "",
) -> list[Path]:
    """Write ``<prefix>_amplitude.png`` and ``<prefix>_phase.png`` with colour bars
    (``amplitude.png`` and ``phase.png`` when ``prefix`` is empty).

    Pixels outside ``mask`` (e.g. never scanned) are shown blank rather than as zeros.
    """
    # A bare Figure prints PNG through Agg by itself; matplotlib.use("Agg") would switch the
    # whole process's backend (a notebook's or a Qt application's pyplot figures with it).
    from matplotlib.figure import Figure

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    obj = np.asarray(obj)
    paths = []
    for name, values, cmap in (
        ("amplitude", np.abs(obj), "gray"),
        ("phase", np.angle(obj), "twilight"),
    ):
        shown = np.ma.masked_where(~mask, values) if mask is not None else values
        figure = Figure(figsize=(5, 4.2), dpi=100)
        axes = figure.add_subplot()
        image = axes.imshow(shown, cmap=cmap, interpolation="nearest")
        figure.colorbar(image, ax=axes, label="rad" if name == "phase" else "a.u.")
        axes.set_title(f"{title} {name}".strip())
        axes.set_xlabel("x [object px]")
        axes.set_ylabel("y [object px]")
        figure.tight_layout()
        path = output / (f"{prefix}_{name}.png" if prefix else f"{name}.png")
        with atomic_write_path(path) as tmp:
            figure.savefig(tmp, format="png")
        paths.append(path)
    return paths
