"""The model archive ``wts.h5.zip``: save and load a ``TrainedModel`` with no code execution.

Layout (shared/design/PTYCHOPINN.md section 9)::

    wts.h5.zip
    |-- manifest.json                      format_version, backend "pytorch", models,
    |                                      package_version, created (UTC), sha256 of every member
    |-- manifest.dill                      the same dict (without its own hash), plain pickle
    |                                      protocol 2 of builtin types: a compatibility copy
    |-- config.json                        flat settings + normalisation constants + history
    |-- probe.npy                          the normalised probe, (modes, N, N) complex64
    |-- starting_probe.npy                 (probe refinement only) the probe it started from
    |-- diffraction_to_obj/weights.safetensors   generator state dict
    `-- autoencoder/weights.safetensors          generator + forward model (probe buffer)

Why this shape: the reference stored dill pickles, and loading one runs arbitrary code. Here
weights are safetensors (pure tensor bytes), the probe is a ``.npy`` read with
``allow_pickle=False``, JSON holds everything else, and ``manifest.dill`` is only ever read by an
unpickler whose ``find_class`` refuses every global, so a pickle can produce builtin
containers and scalars and nothing that runs code. Every member's sha256 is checked before it is
used, and the model is rebuilt from ``config.json`` alone and loaded strictly.

Saving is atomic: the zip is written to a temp file beside the target and renamed into place
only when complete, so an interrupted save never leaves a ``wts.h5.zip`` behind.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import pickle
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as _safetensors_load
from safetensors.torch import save as _safetensors_save

from .atomic import atomic_write_path
from .config import SUPPORTED_BACKEND, GridConfig, ModelConfig
from .data import pixel_size_from
from .model import EpochRecord, TrainedModel
from .payload import create_training_payload

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHIVE_NAME",
    "FORMAT_VERSION",
    "MODEL_NAMES",
    "archive_path",
    "inspect_archive",
    "load_archive",
    "read_manifest",
    "save_archive",
]

ARCHIVE_NAME = "wts.h5.zip"
FORMAT_VERSION = 1
MANIFEST_JSON = "manifest.json"
MANIFEST_DILL = "manifest.dill"
CONFIG_JSON = "config.json"
PROBE_NPY = "probe.npy"
STARTING_PROBE_NPY = "starting_probe.npy"
GENERATOR_MODEL = "diffraction_to_obj"
AUTOENCODER_MODEL = "autoencoder"
MODEL_NAMES = (GENERATOR_MODEL, AUTOENCODER_MODEL)
WEIGHTS_FILE = "weights.safetensors"
#: safetensors metadata key listing tensors stored as view_as_real (complex -> (..., 2) real).
_COMPLEX_KEYS = "complex_keys"
#: Manifest and config members are small; refuse to inflate anything bigger (zip bombs).
_MAX_TEXT_MEMBER = 16 * 1024 * 1024

SIGN_CONVENTIONS = (
    "positions: probe centres in object pixels, x = column, y = row; "
    "group offsets r_c = position - group centroid; translating by r moves content +r "
    "(x to the right, y down); patch pixel j at position x samples object coordinate "
    "x - N/2 + j; patterns are amplitudes sqrt(counts) with zero frequency at the array "
    "centre (fftshift of an orthonormal FFT2); object = amplitude * exp(i * phase)."
)


def _weights_member(model_name: str) -> str:
    return f"{model_name}/{WEIGHTS_FILE}"


# ----------------------------------------------------------------------------- paths
def archive_path(path: str | os.PathLike[str]) -> Path:
    """The archive file for ``path``: ``path`` itself, or ``path/wts.h5.zip`` for a directory.

    A path that exists as a directory, or whose name does not end in ``.zip``, is a directory.
    """
    path = Path(path)
    if path.is_dir() or not path.name.lower().endswith(".zip"):
        return path / ARCHIVE_NAME
    return path


def _existing_archive(path: str | os.PathLike[str]) -> Path:
    given = Path(path)
    if given.is_dir():
        candidate = given / ARCHIVE_NAME
        if not candidate.is_file():
            others = sorted(p.name for p in given.glob("*.zip") if p.is_file())[:5]
            hint = f"; it holds {', '.join(others)}: give that file's path" if others else ""
            raise FileNotFoundError(
                f"model archive not found: {candidate} (directory {given}){hint}"
            )
        return candidate
    if not given.is_file():
        zipped = given.with_name(given.name + ".zip")  # "wts.h5" for "wts.h5.zip"
        hint = f"; did you mean {zipped}?" if zipped.is_file() else ""
        raise FileNotFoundError(f"model archive not found: {given}{hint}")
    return given


# ----------------------------------------------------------------------------- save
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _tensor_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors bytes; complex tensors go in as ``view_as_real``."""
    tensors: dict[str, torch.Tensor] = {}
    complex_keys: list[str] = []
    for key, value in state.items():
        tensor = value.detach().cpu()
        if tensor.is_complex():
            complex_keys.append(key)
            tensor = torch.view_as_real(tensor.resolve_conj())
        tensors[key] = tensor.contiguous()
    return _safetensors_save(tensors, metadata={_COMPLEX_KEYS: json.dumps(complex_keys)})


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _config_document(model: TrainedModel) -> dict[str, Any]:
    return {
        "backend": model.backend,
        "config": dict(model.config),
        "input_scale": float(model.input_scale),
        "intensity_scale": float(model.intensity_scale),
        "nphotons": float(model.nphotons),
        "history": [record.to_dict() for record in model.history],
        "training_device": str(model.training_device),
        "probe_shape": list(model.probe.shape),
        "sign_conventions": SIGN_CONVENTIONS,
        "pixel_size_m": None if model.pixel_size_m is None else list(model.pixel_size_m),
    }


def _package_version() -> str:
    from .. import __version__

    return str(__version__)


def save_archive(model: TrainedModel, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` (a ``.zip`` file, or a directory that gets ``wts.h5.zip``).

    Returns the archive's path. The write is atomic: on any error nothing is left at the
    target (an existing archive there is kept unchanged).
    """
    if model.backend != SUPPORTED_BACKEND:
        raise ValueError(
            f"model.backend = {model.backend!r}: this writer stores {SUPPORTED_BACKEND} models only"
        )
    target = archive_path(path)
    autoencoder_state = model.autoencoder.state_dict()
    generator_state = model.generator.state_dict()
    members: dict[str, bytes] = {}
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "backend": SUPPORTED_BACKEND,
        "models": list(MODEL_NAMES),
        "package": "ptychodus-torch-plugin",
        "package_version": _package_version(),
        "torch_version": torch.__version__.split("+")[0],
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "weights_format": "safetensors",
        "sha256": {},
    }
    with atomic_write_path(target) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:

            def put(name: str, data: bytes) -> None:
                # float weights barely compress (8%) but deflating them costs ~0.4 s each,
                # which every save (and a GUI Stop, which saves) would pay: store them as is.
                stored = name.endswith(".safetensors")
                zf.writestr(name, data, zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
                members[name] = data
                manifest["sha256"][name] = _sha256(data)

            put(CONFIG_JSON, _json_bytes(_config_document(model)))
            put(PROBE_NPY, _npy_bytes(model.probe.astype(np.complex64)))
            if model.starting_probe is not None:  # optional: older loaders verify, then skip it
                put(STARTING_PROBE_NPY, _npy_bytes(model.starting_probe.astype(np.complex64)))
            put(_weights_member(GENERATOR_MODEL), _tensor_bytes(generator_state))
            put(_weights_member(AUTOENCODER_MODEL), _tensor_bytes(autoencoder_state))
            # The compatibility copy: plain builtins only, readable by the restricted unpickler.
            put(MANIFEST_DILL, pickle.dumps(_plain_copy(manifest), protocol=2))
            zf.writestr(MANIFEST_JSON, _json_bytes(manifest))
    return target


def _plain_copy(value: Any) -> Any:
    """A deep copy made only of dict/list/str/int/float/bool/None."""
    if isinstance(value, Mapping):
        return {str(k): _plain_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_copy(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


# ----------------------------------------------------------------------------- read
class _BuiltinsOnlyUnpickler(pickle.Unpickler):
    """Admits only what pickle builds from opcodes alone: builtin containers and scalars.

    Every global lookup (classes, functions, ``__reduce__`` callables) is refused, so a
    pickle that would construct an object or call anything fails before it can run.
    """

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: archive pickles may hold only builtin "
            "containers and scalars (no code is ever executed from an archive)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id: not a plain-data pickle")


def _restricted_loads(data: bytes, where: str) -> Any:
    try:
        return _BuiltinsOnlyUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(
            f"{where}: refused or unreadable pickle ({exc}); only plain builtin data is "
            "accepted and no code from an archive is run"
        ) from exc


def _invalid_archive(path: Path, exc: BaseException) -> ValueError:
    return ValueError(
        f"{path} is not a valid or complete model archive ({type(exc).__name__}: {exc}); "
        "the file may be truncated or corrupt: re-save or re-copy it"
    )


class _Archive:
    """An open archive; every read is wrapped so zip internals never leak as tracebacks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path, "r")
            self.names = set(self._zip.namelist())
        except PermissionError:  # a shared archive we may not read: not a corrupt one
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
            raise _invalid_archive(path, exc) from exc

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self._zip.close()

    def has(self, name: str) -> bool:
        return name in self.names

    def read(self, name: str, max_size: int | None = None) -> bytes:
        if name not in self.names:
            raise ValueError(
                f"{self.path}: archive member '{name}' is missing; found {sorted(self.names)}"
            )
        try:
            info = self._zip.getinfo(name)
            if max_size is not None and info.file_size > max_size:
                raise ValueError(
                    f"{self.path}: member '{name}' is {info.file_size} bytes, larger than "
                    f"the {max_size} allowed"
                )
            if info.flag_bits & 0x1:  # zipfile would raise a bare RuntimeError
                raise ValueError(
                    f"{self.path}: member '{name}' is encrypted; model archives are never "
                    "password-protected: unpack it with its password and load the original "
                    "wts.h5.zip, or re-save the model"
                )
            return self._zip.read(name)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
            raise _invalid_archive(self.path, exc) from exc

    def read_verified(self, name: str, manifest: Mapping[str, Any]) -> bytes:
        expected = manifest.get("sha256", {}).get(name)
        if expected is None:
            raise ValueError(f"{self.path}: manifest.json lists no sha256 for member '{name}'")
        data = self.read(name)
        found = _sha256(data)
        if found != expected:
            raise ValueError(
                f"{self.path}: sha256 mismatch for member '{name}' (manifest {expected[:12]}..., "
                f"found {found[:12]}...): the archive was modified or damaged"
            )
        return data


def _read_manifest(archive: _Archive) -> dict[str, Any]:
    if archive.has(MANIFEST_JSON):
        try:
            manifest = json.loads(archive.read(MANIFEST_JSON, _MAX_TEXT_MEMBER).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{archive.path}: manifest.json is not valid JSON ({exc})") from exc
        source = MANIFEST_JSON
    elif archive.has(MANIFEST_DILL):
        data = archive.read(MANIFEST_DILL, _MAX_TEXT_MEMBER)
        manifest = _restricted_loads(data, f"{archive.path}: {MANIFEST_DILL}")
        source = MANIFEST_DILL
    else:
        raise ValueError(
            f"{archive.path}: archive member '{MANIFEST_JSON}' is missing (and no "
            f"'{MANIFEST_DILL}'): not a PtychoPINN model archive; found {sorted(archive.names)}"
        )
    if not isinstance(manifest, dict):
        raise ValueError(
            f"{archive.path}: {source} holds {type(manifest).__name__}, expected a mapping"
        )
    manifest = dict(manifest)
    # The TensorFlow PtychoPINN archive (manifest version "1.0", Keras members) has no backend
    # but lists its models; a manifest with neither belongs to some other program's zip.
    if "backend" not in manifest:
        if "models" not in manifest:
            raise ValueError(
                f"{archive.path}: {source} names no backend and no models: not a PtychoPINN "
                "model archive (ours are the wts.h5.zip files that Train or "
                "`ptychodus-torch train` write)"
            )
        manifest["backend"] = "tensorflow"
    manifest["_source"] = source
    return manifest


def _check_backend(path: Path, manifest: Mapping[str, Any]) -> None:
    backend = manifest.get("backend")
    if backend != SUPPORTED_BACKEND:
        raise ValueError(
            f"archive was written by the {backend} backend; this loader is {SUPPORTED_BACKEND} "
            f"({path}): retrain the model with ptychodus-torch-plugin, or load it with the "
            f"{backend} PtychoPINN package"
        )
    version = manifest.get("format_version")
    if (
        isinstance(version, bool)
        or not isinstance(version, int)
        or not 1 <= version <= FORMAT_VERSION
    ):
        raise ValueError(
            f"{path}: archive format_version {version!r} is not supported by this loader "
            f"(reads up to {FORMAT_VERSION}); upgrade ptychodus-torch-plugin"
        )


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The archive's manifest (``backend`` is "tensorflow" when it lists models but no backend).

    Reads ``manifest.json``, or, only when that is missing, ``manifest.dill`` through the
    restricted unpickler. Does not check the backend; :func:`load_archive` does.
    """
    file = _existing_archive(path)
    with _Archive(file) as archive:
        manifest = _read_manifest(archive)
    manifest.pop("_source", None)
    return manifest


def _parse_json(path: Path, name: str, data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: member '{name}' is not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{path}: member '{name}' holds no JSON object")
    return value


def _parse_tensors(path: Path, name: str, data: bytes) -> dict[str, Any]:
    try:
        tensors = _safetensors_load(data)
        metadata = _safetensors_metadata(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: member '{name}' is not valid safetensors ({exc})") from exc
    for key in json.loads(metadata.get(_COMPLEX_KEYS, "[]")):
        if key in tensors:
            tensors[key] = torch.view_as_complex(tensors[key].contiguous())
    return tensors


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (header: u64 length + JSON)."""
    if len(data) < 8:
        raise ValueError("truncated safetensors header")
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length].decode("utf-8"))
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}


def _load_strict(module: torch.nn.Module, state: Mapping[str, Any], where: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{key}: archive {tuple(state[key].shape)} {state[key].dtype}, "
        f"model {tuple(own[key].shape)} {own[key].dtype}"
        for key in sorted(set(own) & set(state))
        if tuple(own[key].shape) != tuple(state[key].shape) or own[key].dtype != state[key].dtype
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append("shape/dtype mismatch " + "; ".join(shapes[:5]))
        raise ValueError(
            f"{where}: the stored weights do not fit the network rebuilt from config.json ("
            + ", ".join(parts)
            + ")"
        )
    try:
        module.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{where}: the stored weights do not fit the network ({exc})") from exc


def _number(document: Mapping[str, Any], key: str, path: Path) -> float:
    value = document.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{path}: config.json field '{key}' = {value!r}, expected a number")
    return float(value)


#: Settings that make the network, its physics or its inference what they are: an archive
#: whose value of one of these is refused cannot be rebuilt faithfully, so it is not loaded.
_ESSENTIAL_KEYS = frozenset(
    {f.name for f in dataclasses.fields(GridConfig)}
    | {f.name for f in dataclasses.fields(ModelConfig) if f.name != "grid"}
    | {"probe_scale", "input_normalization", "nphotons", "mode", "probe_refinement_epochs"}
    | {"probe_modes", "backend"}
)


def _loadable_config(config: dict[str, Any], file: Path) -> dict[str, Any]:
    """The archived flat config, without the how-it-was-trained settings this version refuses.

    Why: the network is rebuilt from the geometry, model and physics settings; the others
    (schedule, checkpointing, seeds, loggers) only record how it was trained. A setting that a
    later version tightened or removed (``checkpoint_mode = 'max'``, a seed beyond 2**32, a
    name since retired) must not make every archive that holds it unloadable: it is dropped,
    with a warning naming it, and its default applies if the model is trained further.
    """
    try:
        create_training_payload(config, check_environment=False)
        return config
    except ValueError:
        pass
    kept = {key: value for key, value in config.items() if key in _ESSENTIAL_KEYS}
    create_training_payload(kept, check_environment=False)  # refused: the caller says why
    dropped = []
    for key, value in config.items():
        if key in _ESSENTIAL_KEYS:
            continue
        trial = {**kept, key: value}
        try:
            create_training_payload(trial, check_environment=False)
        except ValueError as exc:
            dropped.append(f"{key} = {value!r} ({exc})")
            continue
        kept = trial
    logger.warning(
        "%s: this version no longer accepts %d training setting(s) stored with the model, "
        "which load with their defaults (the network is unchanged; they matter only if the "
        "model is trained further): %s",
        file,
        len(dropped),
        "; ".join(dropped),
    )
    return kept


def load_archive(path: str | os.PathLike[str]) -> TrainedModel:
    """Rebuild a ``TrainedModel`` from an archive file or a directory holding ``wts.h5.zip``.

    Raises ``FileNotFoundError`` (naming the path) when there is no archive, and ``ValueError``
    for another backend's archive, a refused pickle, a corrupt or truncated zip, a missing
    member, a sha256 mismatch, or weights that do not fit the rebuilt network.
    """
    file = _existing_archive(path)
    with _Archive(file) as archive:
        manifest = _read_manifest(archive)
        _check_backend(file, manifest)
        if manifest["_source"] != MANIFEST_JSON:
            raise ValueError(f"{file}: archive member '{MANIFEST_JSON}' is missing")
        listed = manifest.get("sha256")
        if not isinstance(listed, dict):
            raise ValueError(f"{file}: manifest.json has no 'sha256' table of members")
        required = [CONFIG_JSON, PROBE_NPY, *(_weights_member(m) for m in MODEL_NAMES)]
        for member in [*required, *listed]:
            if not archive.has(member):
                raise ValueError(f"{file}: archive member '{member}' is missing")
        # Verify every listed member, also the ones this loader does not otherwise use.
        blobs = {member: archive.read_verified(member, manifest) for member in [*listed, *required]}
    document = _parse_json(file, CONFIG_JSON, blobs[CONFIG_JSON])
    probe_bytes = blobs[PROBE_NPY]
    generator_name = _weights_member(GENERATOR_MODEL)
    autoencoder_name = _weights_member(AUTOENCODER_MODEL)
    generator_state = _parse_tensors(file, generator_name, blobs[generator_name])
    autoencoder_state = _parse_tensors(file, autoencoder_name, blobs[autoencoder_name])

    probe = _probe_member(file, PROBE_NPY, probe_bytes)
    starting_probe = None
    if STARTING_PROBE_NPY in blobs:
        starting_probe = _probe_member(file, STARTING_PROBE_NPY, blobs[STARTING_PROBE_NPY])
    config = document.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{file}: config.json has no 'config' mapping")
    history_raw = document.get("history") or []
    try:
        history = [EpochRecord.from_dict(item) for item in history_raw]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{file}: config.json 'history' is malformed ({exc})") from exc
    try:
        config = _loadable_config(config, file)
        model = TrainedModel.build(
            config,
            probe,
            input_scale=_number(document, "input_scale", file),
            intensity_scale=_number(document, "intensity_scale", file),
            nphotons=_number(document, "nphotons", file),
            history=history,
            training_device=str(document.get("training_device", "cpu")),
        )
    except ValueError as exc:
        raise ValueError(f"{file}: config.json cannot rebuild the model: {exc}") from exc
    _load_strict(model.generator, generator_state, f"{file}: {GENERATOR_MODEL}")
    _load_strict(model.autoencoder, autoencoder_state, f"{file}: {AUTOENCODER_MODEL}")
    # The autoencoder holds the generator too: both stored copies must agree.
    for key, value in generator_state.items():
        if not torch.equal(model.generator.state_dict()[key], value):
            raise ValueError(
                f"{file}: '{GENERATOR_MODEL}' and '{AUTOENCODER_MODEL}' disagree on weight "
                f"'{key}': the archive is inconsistent"
            )
    model.autoencoder.eval()
    if starting_probe is not None:
        model.starting_probe = starting_probe.reshape(-1, *starting_probe.shape[-2:])
    model.pixel_size_m = _pixel_size(document, file)
    return model


def _pixel_size(document: Mapping[str, Any], file: Path) -> tuple[float, float] | None:
    """The training scan's object pixel size, if recorded (archives before 2026-12-03: no)."""
    try:
        return pixel_size_from(document.get("pixel_size_m"))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{file}: config.json field {exc}") from exc


def _probe_member(file: Path, name: str, data: bytes) -> np.ndarray:
    try:
        probe = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{file}: member '{name}' is not a valid .npy array ({exc})") from exc
    if not np.iscomplexobj(probe) or probe.ndim not in (2, 3):
        raise ValueError(
            f"{file}: member '{name}' holds {probe.dtype} {probe.shape}, expected a complex "
            "(modes, N, N) probe"
        )
    return probe


def inspect_archive(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Manifest, config and integrity of an archive, for ``ptychodus-torch inspect``.

    A PyTorch archive has every member's sha256 verified (``"verified": true``); an archive of
    another backend is described (manifest only) instead of being refused.
    """
    file = _existing_archive(path)
    with _Archive(file) as archive:
        manifest = _read_manifest(archive)
        source = manifest.pop("_source")
        result: dict[str, Any] = {
            "path": str(file),
            "backend": manifest["backend"],
            "manifest_source": source,
            "members": sorted(archive.names),
            "manifest": manifest,
            "config": None,
            "verified": False,
        }
        if manifest["backend"] != SUPPORTED_BACKEND:
            result["note"] = (
                f"archive was written by the {manifest['backend']} backend; this loader is "
                f"{SUPPORTED_BACKEND} and cannot load it"
            )
            return result
        _check_backend(file, manifest)
        blobs = {m: archive.read_verified(m, manifest) for m in manifest.get("sha256", {})}
        if CONFIG_JSON not in blobs:
            blobs[CONFIG_JSON] = archive.read_verified(CONFIG_JSON, manifest)
        result["config"] = _parse_json(file, CONFIG_JSON, blobs[CONFIG_JSON])
        result["verified"] = True
    return result
