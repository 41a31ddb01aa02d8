"""Names the host integration is known by: one place, so nothing can disagree.

The Ptychodus algorithm key is ``<library>_<reconstructor>`` casefolded and split at the
*first* ``_``, so the library name has no ``_``; it must also differ from the built-in
libraries (pty-chi, PtychoNN, PtychoPINN, PtychoPINN-Torch, PtychoFM).
"""

from __future__ import annotations

#: Library name shown in the algorithm list (keys ``torchpinn_pinn``, ``torchpinn_supervised``).
LIBRARY_NAME = "TorchPINN"
PINN_NAME = "PINN"
SUPERVISED_NAME = "Supervised"
RECONSTRUCTOR_MODES = {PINN_NAME: "pinn", SUPERVISED_NAME: "supervised"}

#: The package's root logger: the host attaches its GUI log-pane handler to the library's
#: logger, and every module of this package (engine included) logs below this name.
LOGGER_NAME = "ptychodus_torch_plugin"

#: Settings groups (INI sections). Built-in groups are PtychoPINN*, PtychoPINNTorch*, ...
SETTINGS_PREFIX = "TorchPINN"

MODEL_FILE_FILTER = "PtychoPINN model archive (*.h5.zip)"
MODEL_FILE_EXTENSION = ".h5.zip"  # batch mode loads IN/model.h5.zip
ARCHIVE_NAME = "wts.h5.zip"  # what training writes into its output directory
TRAINING_DATA_FILE_FILTER = "PtychoPINN training data (*.npz)"
TRAINING_DATA_NAME = "train_data.npz"
TEST_DATA_NAME = "test_data.npz"

ENTRY_POINT_GROUP = "ptychodus.reconstructors"
VIEW_FACTORY = "ptychodus_torch_plugin.gui.panel:create_view_controller_factory"

#: Ptychodus releases this adapter was written and tested against (major, minor).
SUPPORTED_HOST_SERIES = ((1, 7),)

BACKEND_HINT = (
    "PyTorch backend selected, but {what} cannot be imported ({error}). Install it into the "
    'environment that runs Ptychodus: pip install "torch>=2.2" "lightning>=2.4"'
)


def algorithm_key(reconstructor_name: str) -> str:
    """The ``[Processing] Algorithm`` value that selects one of our reconstructors."""
    return f"{LIBRARY_NAME.casefold()}_{reconstructor_name.casefold()}"
