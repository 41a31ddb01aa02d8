"""Helpers for the engine tests (a uniquely named module: tests never import from conftest)."""


def tiny_overrides(**extra):
    """A fast CPU training configuration for tests."""
    values = {
        "N": 32,
        "n_filters_scale": 1,
        "epochs": 2,
        "batch_size": 16,
        "accelerator": "cpu",
        "logger": "none",
        "enable_progress_bar": False,
    }
    values.update(extra)
    return values
