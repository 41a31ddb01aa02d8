"""The live loss curve: training and validation loss per epoch on a log scale.

A matplotlib ``FigureCanvasQTAgg`` (what Ptychodus's own plots use). Drawing happens on the GUI
thread, so it is kept cheap: a fixed layout (no tight-layout pass), major grid lines only, one
legend made once, ``draw_idle`` (a burst of updates costs one repaint) and no drawing while
the plot is hidden (it catches up when shown). Only positive, finite values can be drawn on a
log axis; other values are left out of the lines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from matplotlib.backends.backend_qt5agg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter
from PyQt5.QtWidgets import QSizePolicy, QVBoxLayout, QWidget


def _tick_label(value: float, _position: int) -> str:
    return f"{value:.3g}"


def _minor_tick_label(value: float, _position: int) -> str:
    """Label the 2x and 5x minor ticks (used when the curve spans less than a decade)."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:.3g}" if round(mantissa, 6) in (2.0, 5.0) else ""


def _plottable(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


class LossPlot(QWidget):
    """Per-epoch training and validation loss (semilogy), one point per finished epoch."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.figure = Figure(figsize=(4.2, 2.6), dpi=100)
        self.figure.subplots_adjust(left=0.17, right=0.97, top=0.89, bottom=0.19)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        self.canvas.setMinimumHeight(200)
        self.axes = self.figure.add_subplot(111)
        self._train: list[tuple[int, float]] = []
        self._validation: list[tuple[int, float]] = []
        self._title = "Loss"
        (self._train_line,) = self.axes.semilogy([], [], "o-", ms=3, lw=1.5, label="training")
        (self._validation_line,) = self.axes.semilogy(
            [], [], "s--", ms=3, lw=1.2, label="validation"
        )
        self._style()
        self.axes.legend(fontsize=7, loc="upper right")
        self._stale = True
        layout = QVBoxLayout()
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self.setLayout(layout)

    # ------------------------------------------------------------------ data
    def training_points(self) -> list[tuple[int, float]]:
        return list(self._train)

    def validation_points(self) -> list[tuple[int, float]]:
        return list(self._validation)

    @property
    def title(self) -> str:
        return self._title

    def clear(self, title: str = "Loss") -> None:
        self._train.clear()
        self._validation.clear()
        self._title = title
        self._refresh()

    def add_epoch(self, epoch: int, train_loss: float, val_loss: float | None = None) -> None:
        """One finished epoch (replaces a point already drawn for that epoch)."""
        self._train = [p for p in self._train if p[0] != epoch]
        self._validation = [p for p in self._validation if p[0] != epoch]
        if _plottable(train_loss):
            self._train.append((int(epoch), float(train_loss)))
        if _plottable(val_loss):
            self._validation.append((int(epoch), float(val_loss)))  # type: ignore[arg-type]
        self._refresh()

    def add_record(self, record: Any) -> None:
        """An engine ``EpochRecord`` (or anything with epoch/train_loss/val_loss)."""
        self.add_epoch(record.epoch, record.train_loss, getattr(record, "val_loss", None))

    def set_history(self, records: Iterable[Any], title: str = "Loss") -> None:
        """Show a whole history (records or dicts with epoch/train_loss/val_loss)."""
        self._train.clear()
        self._validation.clear()
        self._title = title
        for record in records:
            if isinstance(record, dict):
                epoch, train, val = record["epoch"], record["train_loss"], record.get("val_loss")
            else:
                epoch, train, val = record.epoch, record.train_loss, record.val_loss
            if _plottable(train):
                self._train.append((int(epoch), float(train)))
            if _plottable(val):
                self._validation.append((int(epoch), float(val)))
        self._refresh()

    # ------------------------------------------------------------------ drawing
    def _style(self) -> None:
        ax = self.axes
        ax.set_title(self._title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        # plain "1e+05" labels: the default log formatter typesets every label with mathtext
        ax.yaxis.set_major_formatter(FuncFormatter(_tick_label))
        ax.yaxis.set_minor_formatter(NullFormatter())

    def _refresh(self) -> None:
        pairs = ((self._train_line, self._train), (self._validation_line, self._validation))
        for line, points in pairs:
            line.set_data([p[0] for p in points], [p[1] for p in points])
        ax = self.axes
        ax.set_title(self._title, fontsize=9)
        points = self._train + self._validation
        if points:
            epochs = [p[0] for p in points]
            values = [p[1] for p in points]
            low, high = min(epochs), max(epochs)
            ax.set_xlim(low - 0.5, high + 0.5)
            low_y, high_y = min(values) / 1.5, max(values) * 1.5
            ax.set_ylim(low_y, high_y)
            narrow = high_y / low_y < 30  # at most one major (power of ten) tick visible
            ax.yaxis.set_minor_formatter(
                FuncFormatter(_minor_tick_label) if narrow else NullFormatter()
            )
        else:
            ax.set_xlim(0.5, 1.5)
            ax.set_ylim(0.1, 10.0)
        self._stale = True
        if self.canvas.isVisible():
            self._stale = False
            self.canvas.draw_idle()

    def showEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        super().showEvent(event)
        if self._stale:
            self._stale = False
            self.canvas.draw_idle()
