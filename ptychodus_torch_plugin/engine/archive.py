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

Every member is read with a size cap, checked against the zip's declared (uncompressed) size
and again while it inflates, a megabyte at a time: a few kilobytes of zeros can inflate to
gigabytes, and an archive is data from elsewhere. Only the stored and deflated methods this
writer uses are read (zipfile inflates bzip2 and LZMA members without any bound).

Importing this module does not import torch (torch, safetensors.torch and the model are
imported by the functions that need them): the host's Load Model check
(``host/model_slot.check_archive``) runs on the Qt thread and shares :data:`FORMAT_VERSION`,
:data:`MAX_TEXT_MEMBER` and :func:`check_format_version` with this loader.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import io
import json
import logging
import math
import os
import pickle
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import atomic_write_path
from .config import MAX_PROBE_MODES, PATCH_SIZES, SUPPORTED_BACKEND, GridConfig, ModelConfig
from .data import pixel_size_from
from .payload import create_training_payload

if TYPE_CHECKING:  # imported at run time by the functions that use them (see the docstring)
    import torch

    from .model import TrainedModel

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHIVE_NAME",
    "FORMAT_VERSION",
    "MAX_TEXT_MEMBER",
    "MODEL_NAMES",
    "archive_path",
    "check_format_version",
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
#: Manifest and config members are small (kilobytes); refuse to inflate anything bigger.
MAX_TEXT_MEMBER = 16 * 1024 * 1024
#: Most probe modes a stored probe may hold. Not MAX_PROBE_MODES: that bounds the modes a
#: refinement fits, while ``probe_modes = 0`` keeps all of a scan's modes, which may be more.
_MAX_STORED_PROBE_MODES = 16 * MAX_PROBE_MODES
#: A .npy probe: (modes, N, N) complex64 at the largest patch size, plus its header.
_MAX_PROBE_MEMBER = _MAX_STORED_PROBE_MODES * max(PATCH_SIZES) ** 2 * 8 + 64 * 1024
#: Weights when no network is at hand to size them (inspect, members this loader does not
#: know): the largest network (N = 256, n_filters_scale = 8) stores about 0.2 GB.
_MAX_WEIGHTS_MEMBER = 2 * 1024**3
#: safetensors header allowance for a state dict: a fixed part plus some per tensor (its
#: name twice, dtype, shape and offsets, and its name in the complex_keys metadata).
_WEIGHTS_HEADER_BYTES = 1024 * 1024
_WEIGHTS_HEADER_BYTES_PER_TENSOR = 1024
#: Members are inflated this much at a time, so a forged declared size overshoots by at most this.
_READ_CHUNK = 1024 * 1024

SIGN_CONVENTIONS = (
    "positions: probe centres in object pixels, x = column, y = row; "
    "group offsets r_c = position - group centroid; translating by r moves content +r "
    "(x to the right, y down); patch pixel j at position x samples object coordinate "
    "x - N/2 + j; patterns are amplitudes sqrt(counts) with zero frequency at the array "
    "centre (fftshift of an orthonormal FFT2); object = amplitude * exp(i * phase)."
)


def _weights_member(model_name: str) -> str:
    return f"{model_name}/{WEIGHTS_FILE}"


def _member_cap(name: str) -> tuple[int, str]:
    """The most bytes member ``name`` may inflate to without a network to size it, and why."""
    if name in (MANIFEST_JSON, MANIFEST_DILL, CONFIG_JSON):
        return MAX_TEXT_MEMBER, "manifests and config.json hold a few kilobytes"
    if name in (PROBE_NPY, STARTING_PROBE_NPY):
        return _MAX_PROBE_MEMBER, (
            f"a probe of up to {_MAX_STORED_PROBE_MODES} modes of "
            f"{max(PATCH_SIZES)} x {max(PATCH_SIZES)} complex64"
        )
    return _MAX_WEIGHTS_MEMBER, "the weights of the largest network are about 0.2 GB"


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
    import torch
    from safetensors.torch import save as _safetensors_save

    tensors: dict[str, torch.Tensor] = {}
    complex_keys: list[str] = []
    for key, value in state.items():
        tensor = value.detach().cpu()
        if tensor.is_complex():
            complex_keys.append(key)
            tensor = torch.view_as_real(tensor.resolve_conj())
        tensors[key] = tensor.contiguous()
    return _safetensors_save(tensors, metadata={_COMPLEX_KEYS: json.dumps(complex_keys)})


def _first_non_finite(state: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point or complex tensor holding NaN or inf, if any."""
    import torch

    for key, value in state.items():
        if (value.is_floating_point() or value.is_complex()) and not bool(
            torch.isfinite(value).all()
        ):
            return key
    return None


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
    target (an existing archive there is kept unchanged). Raises ``ValueError`` for weights
    holding NaN or inf: :func:`load_archive` refuses them, so such an archive is never written
    (training keeps its last finite weights when it diverges, so it never saves them).
    """
    import torch

    if model.backend != SUPPORTED_BACKEND:
        raise ValueError(
            f"model.backend = {model.backend!r}: this writer stores {SUPPORTED_BACKEND} models only"
        )
    target = archive_path(path)
    autoencoder_state = model.autoencoder.state_dict()
    generator_state = model.generator.state_dict()
    for model_name, state in (
        (GENERATOR_MODEL, generator_state),
        (AUTOENCODER_MODEL, autoencoder_state),
    ):
        bad = _first_non_finite(state)
        if bad is not None:
            raise ValueError(
                f"not saving {target}: weight '{bad}' of '{model_name}' holds NaN or inf, so "
                "training diverged and the model is unusable (no loader would accept it); "
                "retrain, e.g. with a lower learning rate"
            )
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

    def _checked_info(self, name: str, max_size: int, why: str) -> zipfile.ZipInfo:
        """Member ``name``'s entry, refused when missing, encrypted, compressed by a method
        this writer never uses, or declared over ``max_size`` bytes (the declared size can
        lie: :meth:`_chunks` counts what really inflates)."""
        if name not in self.names:
            raise ValueError(
                f"{self.path}: archive member '{name}' is missing; found {sorted(self.names)}"
            )
        info = self._zip.getinfo(name)
        if info.file_size > max_size:
            raise ValueError(
                f"{self.path}: member '{name}' inflates to {info.file_size} bytes, more than the "
                f"{max_size} allowed ({why}): the member is damaged or does not belong in this "
                "archive; re-save the model, or re-copy the archive from where it was written"
            )
        if info.flag_bits & 0x1:  # zipfile would raise a bare RuntimeError
            raise ValueError(
                f"{self.path}: member '{name}' is encrypted; model archives are never "
                "password-protected: unpack it with its password and load the original "
                "wts.h5.zip, or re-save the model"
            )
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ValueError(
                f"{self.path}: member '{name}' is compressed with zip method "
                f"{info.compress_type}; model archives hold stored or deflated members only: "
                "the archive was repacked by another tool or was not written by "
                "ptychodus-torch-plugin; load the original wts.h5.zip, or re-save the model"
            )
        return info

    def _chunks(self, name: str, max_size: int, why: str) -> Iterator[bytes]:
        """Member ``name``'s bytes a megabyte at a time.

        Why chunks: ``ZipFile.read`` hands the whole declared size to one inflate call, which
        may expand up to a gigabyte before zipfile trims it; read a megabyte at a time, a
        member that declares a small size and inflates more is stopped at its declared size,
        where zipfile's CRC check then fails (reported as an invalid archive). The count
        against ``max_size`` below is a backstop should zipfile ever stop trimming.
        """
        info = self._checked_info(name, max_size, why)
        total = 0
        with self._zip.open(info) as stream:
            while chunk := stream.read(_READ_CHUNK):
                total += len(chunk)
                if total > max_size:
                    raise ValueError(
                        f"{self.path}: member '{name}' inflates past the {max_size} bytes "
                        f"allowed ({why}) although it declares {info.file_size}: the archive "
                        "is damaged or forged; re-save the model, or re-copy the archive "
                        "from where it was written"
                    )
                yield chunk

    def read(self, name: str, max_size: int, why: str) -> bytes:
        """Member ``name``'s bytes; ``max_size`` caps it (``why`` says where the cap comes from)."""
        try:
            return b"".join(self._chunks(name, max_size, why))
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
            raise _invalid_archive(self.path, exc) from exc

    def read_verified(
        self, name: str, manifest: Mapping[str, Any], max_size: int, why: str
    ) -> bytes:
        """Member ``name``'s bytes, checked against the manifest's sha256."""
        expected = self._expected_sha(name, manifest)
        data = self.read(name, max_size, why)
        self._compare_sha(name, expected, _sha256(data))
        return data

    def verify(self, name: str, manifest: Mapping[str, Any], max_size: int, why: str) -> None:
        """Check member ``name`` against the manifest's sha256 without holding it in memory.

        For members that are verified but not used here: a member a newer version added, or
        every member when ``inspect`` describes an archive.
        """
        expected = self._expected_sha(name, manifest)
        digest = hashlib.sha256()
        try:
            for chunk in self._chunks(name, max_size, why):
                digest.update(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
            raise _invalid_archive(self.path, exc) from exc
        self._compare_sha(name, expected, digest.hexdigest())

    def _expected_sha(self, name: str, manifest: Mapping[str, Any]) -> str:
        table = manifest.get("sha256")
        expected = table.get(name) if isinstance(table, Mapping) else None
        if not isinstance(expected, str):
            raise ValueError(f"{self.path}: manifest.json lists no sha256 for member '{name}'")
        return expected

    def _compare_sha(self, name: str, expected: str, found: str) -> None:
        if found != expected:
            raise ValueError(
                f"{self.path}: sha256 mismatch for member '{name}' (manifest {expected[:12]}..., "
                f"found {found[:12]}...): the archive was modified or damaged"
            )


def _read_manifest(archive: _Archive) -> dict[str, Any]:
    if archive.has(MANIFEST_JSON):
        try:
            data = archive.read(MANIFEST_JSON, *_member_cap(MANIFEST_JSON))
            manifest = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"{archive.path}: manifest.json is not valid JSON ({exc})") from exc
        source = MANIFEST_JSON
    elif archive.has(MANIFEST_DILL):
        data = archive.read(MANIFEST_DILL, *_member_cap(MANIFEST_DILL))
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
    check_format_version(path, manifest)


def _newer_format(manifest: Mapping[str, Any]) -> int | None:
    """The manifest's format_version when it is a valid one newer than this loader reads."""
    version = manifest.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        return version
    return None


def check_format_version(path: Path, manifest: Mapping[str, Any]) -> None:
    """Refuse a PyTorch manifest whose ``format_version`` this loader cannot read.

    Two cases, two remedies: a newer version needs a newer plugin; a missing, non-integer or
    non-positive one means the archive is damaged or was written by something else, which no
    upgrade helps. Standard library only: ``host/model_slot.check_archive`` calls it on the
    Qt thread, so Load Model refuses what Reconstruct would refuse, with the same words.
    """
    version = manifest.get("format_version")
    newer = _newer_format(manifest)
    if newer is not None:
        raise ValueError(
            f"{path}: archive format_version {newer} is newer than this loader reads (1 to "
            f"{FORMAT_VERSION}): upgrade ptychodus-torch-plugin to load it"
        )
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        found = "is missing" if "format_version" not in manifest else f"= {version!r}"
        raise ValueError(
            f"{path}: the manifest's format_version {found}, expected an integer from 1 to "
            f"{FORMAT_VERSION}: the archive is damaged or was not written by "
            "ptychodus-torch-plugin; re-save the model, or re-copy the archive from where it "
            "was written"
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


def read_summary_documents(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest and the ``config.json`` document ({} when absent) of the archive at ``path``.

    For a status line that describes an archive on the GUI thread: both are small members,
    read under the same caps and checks as :func:`load_archive` (so a forged or repacked
    archive cannot make the GUI inflate gigabytes), without importing torch and without
    checking checksums or the network (Load Model does that).
    """
    file = _existing_archive(path)
    with _Archive(file) as archive:
        manifest = _read_manifest(archive)
        document: dict[str, Any] = {}
        if archive.has(CONFIG_JSON):
            document = _parse_json(
                file, CONFIG_JSON, archive.read(CONFIG_JSON, *_member_cap(CONFIG_JSON))
            )
    manifest.pop("_source", None)
    return manifest, document


def _parse_json(path: Path, name: str, data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{path}: member '{name}' is not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{path}: member '{name}' holds no JSON object")
    return value


def _parse_tensors(path: Path, name: str, data: bytes) -> dict[str, Any]:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load as _safetensors_load

    try:
        tensors = _safetensors_load(data)
        complex_keys = _complex_keys(_safetensors_metadata(data), tensors)
        for key in complex_keys:
            tensors[key] = torch.view_as_complex(tensors[key].contiguous())
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: member '{name}' is not valid safetensors ({exc})") from exc
    return tensors


def _complex_keys(metadata: Mapping[str, str], tensors: Mapping[str, Any]) -> list[str]:
    """The tensors stored as ``view_as_real`` (``complex_keys`` metadata), checked.

    Why checked: the metadata is text from the archive; a malformed entry used to surface as
    a bare TypeError or RuntimeError instead of naming the member.
    """
    raw = metadata.get(_COMPLEX_KEYS, "[]")
    keys = json.loads(raw)  # a JSONDecodeError is a ValueError: the caller names the member
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise ValueError(
            f"metadata '{_COMPLEX_KEYS}' = {raw[:80]!r} is not a JSON list of tensor names"
        )
    if len(set(keys)) != len(keys):
        raise ValueError(f"metadata '{_COMPLEX_KEYS}' names a tensor twice: {raw[:80]!r}")
    for key in keys:
        tensor = tensors.get(key)
        if tensor is None:
            raise ValueError(f"metadata '{_COMPLEX_KEYS}' names '{key}', which is not stored")
        if tensor.ndim < 1 or tensor.shape[-1] != 2 or not tensor.is_floating_point():
            raise ValueError(
                f"metadata '{_COMPLEX_KEYS}' names '{key}', stored as {tensor.dtype} "
                f"{tuple(tensor.shape)}: a complex tensor is stored as real numbers with a "
                "last dimension of 2"
            )
    return keys


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (header: u64 length + JSON)."""
    if len(data) < 8:
        raise ValueError("truncated safetensors header")
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length].decode("utf-8"))
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        return {}
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


def _positive_number(document: Mapping[str, Any], key: str, path: Path) -> float:
    """A normalisation constant: a finite number > 0 (JSON also reads NaN and Infinity)."""
    value = document.get(key)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(
            f"{path}: config.json field '{key}' = {value!r}, expected a finite number > 0 "
            "(training always stores one): the archive is damaged or was edited; re-save the "
            "model, or re-copy the archive from where it was written"
        )
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
    for another backend's archive, an unreadable format_version, a refused pickle, a corrupt or
    truncated zip, a missing member, a member larger than it can be, a sha256 mismatch,
    weights holding NaN or inf, or weights that do not fit the rebuilt network.
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
        weights = {name: _weights_member(name) for name in MODEL_NAMES}
        required = [CONFIG_JSON, PROBE_NPY, *weights.values()]
        for member in [*required, *listed]:
            if not archive.has(member):
                raise ValueError(f"{file}: archive member '{member}' is missing")

        def read(member: str) -> bytes:
            return archive.read_verified(member, manifest, *_member_cap(member))

        # Config and probe first: the network they rebuild says how large its weights are,
        # which caps what the weights members may inflate to.
        document = _parse_json(file, CONFIG_JSON, read(CONFIG_JSON))
        probe = _probe_member(file, PROBE_NPY, read(PROBE_NPY))
        starting_probe = None
        if STARTING_PROBE_NPY in listed:  # optional; an unlisted copy is not trusted
            starting_probe = _probe_member(file, STARTING_PROBE_NPY, read(STARTING_PROBE_NPY))
        model = _rebuilt_model(file, document, probe)
        modules = {GENERATOR_MODEL: model.generator, AUTOENCODER_MODEL: model.autoencoder}
        states = {}
        for model_name, member in weights.items():
            cap, why = _weights_cap(modules[model_name])
            states[model_name] = state = _parse_tensors(
                file, member, archive.read_verified(member, manifest, cap, why)
            )
            bad = _first_non_finite(state)
            if bad is not None:
                raise ValueError(
                    f"{file}: member '{member}' holds non-finite weights (NaN or inf, first in "
                    f"'{bad}'): the training that wrote it diverged, so the model is unusable; "
                    "retrain it, e.g. with a lower learning rate"
                )
        # Verify every listed member, also the ones this loader does not otherwise use.
        for member in listed:
            if member not in required and member != STARTING_PROBE_NPY:
                archive.verify(member, manifest, *_member_cap(member))
    _load_strict(model.generator, states[GENERATOR_MODEL], f"{file}: {GENERATOR_MODEL}")
    _load_strict(model.autoencoder, states[AUTOENCODER_MODEL], f"{file}: {AUTOENCODER_MODEL}")
    # The autoencoder holds the generator too: both stored copies must agree.
    loaded = model.generator.state_dict()
    for key, value in states[GENERATOR_MODEL].items():
        if not _same_bits(loaded[key], value):
            raise ValueError(
                f"{file}: '{GENERATOR_MODEL}' and '{AUTOENCODER_MODEL}' disagree on weight "
                f"'{key}': the archive is inconsistent"
            )
    model.autoencoder.eval()
    if starting_probe is not None:
        model.starting_probe = starting_probe.reshape(-1, *starting_probe.shape[-2:])
    model.pixel_size_m = _pixel_size(document, file)
    return model


def _rebuilt_model(file: Path, document: Mapping[str, Any], probe: np.ndarray) -> TrainedModel:
    """The (untrained) network that ``config.json`` describes, ready for its weights."""
    from .model import EpochRecord, TrainedModel

    config = document.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{file}: config.json has no 'config' mapping")
    history_raw = document.get("history") or []
    try:
        history = [EpochRecord.from_dict(item) for item in history_raw]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{file}: config.json 'history' is malformed ({exc})") from exc
    scales = {
        key: _positive_number(document, key, file)
        for key in ("input_scale", "intensity_scale", "nphotons")
    }
    try:
        config = _loadable_config(config, file)
        return TrainedModel.build(
            config,
            probe,
            **scales,
            history=history,
            training_device=str(document.get("training_device", "cpu")),
        )
    except ValueError as exc:
        raise ValueError(f"{file}: config.json cannot rebuild the model: {exc}") from exc


def _weights_cap(module: torch.nn.Module) -> tuple[int, str]:
    """The most bytes ``module``'s stored state dict may inflate to, and why."""
    state = module.state_dict()
    data = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    cap = data + _WEIGHTS_HEADER_BYTES + _WEIGHTS_HEADER_BYTES_PER_TENSOR * len(state)
    return cap, (
        f"the network rebuilt from config.json stores {len(state)} tensors of {data} bytes, "
        "plus their header"
    )


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality: ``torch.equal`` says NaN != NaN, so it would call two identical
    copies of a non-finite weight different."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False

    def raw(tensor: torch.Tensor) -> torch.Tensor:
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        return flat.view(torch.uint8)

    return torch.equal(raw(a), raw(b))


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
    another backend, or of a format_version newer than this loader reads, is described
    (manifest only, with a ``note`` saying why) instead of being refused.
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
        newer = _newer_format(manifest)
        if newer is not None:  # described, as another backend's archive is, not refused
            result["note"] = (
                f"archive format_version {newer} is newer than this loader reads (1 to "
                f"{FORMAT_VERSION}): its members are neither verified nor described; upgrade "
                "ptychodus-torch-plugin to load it"
            )
            return result
        _check_backend(file, manifest)
        listed = manifest.get("sha256")
        for member in listed if isinstance(listed, Mapping) else {}:
            if member != CONFIG_JSON:  # streamed: inspect holds no weights in memory
                archive.verify(member, manifest, *_member_cap(member))
        config = archive.read_verified(CONFIG_JSON, manifest, *_member_cap(CONFIG_JSON))
        result["config"] = _parse_json(file, CONFIG_JSON, config)
        result["verified"] = True
    return result
