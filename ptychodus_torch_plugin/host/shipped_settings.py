"""The ready-made settings files, found where pip installed them or in the source tree.

Why: the user guide points beamline scientists at ``torchpinn-quality.ini`` and friends, and a
``pip install`` gives them no source tree to find ``resources/settings/`` in. The files are
installed as package data in ``ptychodus_torch_plugin/settings/`` (pyproject.toml maps that
folder to ``resources/settings/``, so there is one copy in the repository); a checkout run
without installing (``PYTHONPATH`` pointing at it) uses ``resources/settings/`` directly.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["copy_shipped_settings", "settings_folder", "shipped_settings_file"]

_PACKAGE = Path(__file__).resolve().parents[1]
_INSTALLED = _PACKAGE / "settings"
_SOURCE_TREE = _PACKAGE.parent / "resources" / "settings"


def settings_folder() -> Path:
    """The folder holding the ready-made ``torchpinn-*.ini`` files."""
    for folder in (_INSTALLED, _SOURCE_TREE):
        if any(folder.glob("*.ini")):
            return folder
    raise FileNotFoundError(
        f"the ready-made settings files are missing (looked in {_INSTALLED} and "
        f"{_SOURCE_TREE}): reinstall ptychodus-torch-plugin"
    )


def shipped_settings_file(name: str) -> Path:
    """The ready-made file ``name`` (``torchpinn-tiny`` or ``torchpinn-tiny.ini``)."""
    folder = settings_folder()
    file = folder / (name if name.endswith(".ini") else f"{name}.ini")
    if not file.is_file() or Path(name).name != name:
        available = ", ".join(sorted(path.name for path in folder.glob("*.ini")))
        raise FileNotFoundError(
            f"no ready-made settings file is named {name!r} (they are: {available})"
        )
    return file


def copy_shipped_settings(directory: str | Path) -> list[Path]:
    """Copy every ready-made file into ``directory`` (created); never overwrites a file.

    Why not overwrite: the copies are meant to be edited, and a second call must not undo
    someone's edits. Returns the files written.
    """
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for source in sorted(settings_folder().glob("*.ini")):
        destination = target / source.name
        try:  # "x": never write into an existing file, nor through a link left there
            with open(destination, "xb") as out:
                out.write(source.read_bytes())
        except FileExistsError:
            continue
        written.append(destination)
    return written
