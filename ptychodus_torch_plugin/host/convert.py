"""Ptychodus data <-> engine arrays: units, geometry, masks, probe modes, losses.

* Patterns: Ptychodus hands over **intensities** (counts, possibly uint16). They become
  float32 amplitudes chunk by chunk (the engine's ``amplitudes_from_counts``, float64 before
  the square root). Bad pixels are zeroed there, whatever the host did (batch mode does not
  zero them), and the mask goes to the engine so the loss ignores them; pixels at the integer
  dtype's largest value (detector gap/dead marks) join the mask with a warning. Negative
  counts (background-subtracted data) are clipped.
* Positions: metres -> object pixels with the input object's geometry (pixel ``i`` centred at
  ``i``). Ptychodus anchors an N-pixel patch at ``x - (N-1)/2``, the engine at ``x - N/2``, so
  engine coordinates are Ptychodus pixel coordinates + 0.5; with that, both share one object
  pixel frame and the stitched canvas ``CanvasGeometry(0, 0, W, H)`` *is* the input object.
* Probe: the incoherent mode stack at OPR index 0, shape (modes, N, N). A model trained with
  probe refinement hands its refined probe back in the result (:func:`result_probes`).
* Result: an ``Object`` with the input's pixel geometry, centre and layer spacing; the
  reconstruction (the total transmission) goes into layer 0 and the other layers are 1 there,
  so the product of the layers is the reconstruction; pixels no patch has reached yet keep
  the input object, so a streamed image fills in chunk by chunk.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ptychodus.api.object import Object
from ptychodus.api.probe import ProbeSequence
from ptychodus.api.product import LossValue, Product
from ptychodus.api.reconstruct import ReconstructInput

from .names import LOGGER_NAME, TEST_DATA_NAME, TRAINING_DATA_NAME

if TYPE_CHECKING:  # engine types; the modules are imported lazily at work time
    from ..engine.data import PtychoData
    from ..engine.inference import CanvasGeometry, StitchedObject
    from ..engine.model import TrainedModel

logger = logging.getLogger(f"{LOGGER_NAME}.host.convert")

#: Engine patch anchoring minus Ptychodus patch anchoring, in object pixels (see above).
#: (``engine.data.PTYCHODUS_PIXEL_OFFSET`` too, for Ptychodus's NPZ export; a test ties them;
#: not imported here, so that reading this module does not import the engine.)
ENGINE_MINUS_HOST_PX = 0.5

DIFFRACTION_FILE = "diffraction.h5"
PRODUCT_FILE = "product.h5"


def probe_modes(product: Product) -> np.ndarray:
    """(modes, H, W) complex probe stack at OPR index 0.

    The engine has one probe for the whole scan; a probe with orthogonal probe relaxation
    (several OPR modes, weighted per position) is used through its first OPR mode, and the
    log says so, since the per-position variation is then ignored.
    """
    array = np.asarray(product.probes.get_array())
    if array.ndim == 4 and array.shape[0] > 1:
        logger.warning(
            "the probe has %d orthogonal probe relaxation (OPR) modes; TorchPINN uses one "
            "probe for every position: the first OPR mode",
            array.shape[0],
        )
    return array[0] if array.ndim == 4 else array


def object_pixel_positions(product: Product) -> tuple[np.ndarray, np.ndarray]:
    """Scan positions in engine object-pixel coordinates (x = column, y = row)."""
    geometry = product.object_.get_geometry()
    x = geometry.map_probe_positions_to_object_x_px(product.probe_positions)
    y = geometry.map_probe_positions_to_object_y_px(product.probe_positions)
    return (
        np.asarray(x, dtype=np.float64) + ENGINE_MINUS_HOST_PX,
        np.asarray(y, dtype=np.float64) + ENGINE_MINUS_HOST_PX,
    )


def bad_pixel_mask(parameters: ReconstructInput) -> np.ndarray | None:
    """Ptychodus's bad-pixel mask as a boolean (H, W) mask of the patterns, or None.

    A mask of another shape is refused, as the engine's loaders refuse one: ignored, it masks
    nothing, and the flag or NaN values it was meant to hide then wreck training or are
    blamed on good detector pixels.
    """
    mask = parameters.bad_pixels
    if mask is None:
        return None
    mask = np.asarray(mask, dtype=bool)
    shape = np.shape(parameters.diffraction_patterns)[1:]
    if mask.shape != shape:
        raise ValueError(
            f"bad_pixels: the bad-pixel mask has shape {mask.shape}, the diffraction patterns "
            f"{shape}; Ptychodus crops or bins the whole detector's mask with the patterns, so "
            "this one is stale: reset the bad-pixel mask in Ptychodus, or reload the mask file "
            "and the patterns, then run again"
        )
    return mask


def reconstruct_input_to_data(
    parameters: ReconstructInput, *, with_object: bool = True
) -> PtychoData:
    """A Ptychodus ``ReconstructInput`` as the engine's validated ``PtychoData``."""
    from ..engine.data import PtychoData, amplitudes_from_counts, with_flagged_pixels

    patterns = np.asarray(parameters.diffraction_patterns)
    if patterns.ndim != 3 or patterns.shape[0] == 0:
        raise ValueError(
            f"diffraction patterns: found shape {patterns.shape}, expected (n, N, N) with n >= 1"
        )
    if patterns.shape[1] != patterns.shape[2]:
        raise ValueError(
            f"diffraction patterns: found {patterns.shape[1]} x {patterns.shape[2]} pixels, "
            "expected square patterns: crop the detector to a square region in Ptychodus"
        )
    if np.iscomplexobj(patterns) or not (
        np.issubdtype(patterns.dtype, np.integer) or np.issubdtype(patterns.dtype, np.floating)
    ):
        raise ValueError(
            f"diffraction patterns: found dtype {patterns.dtype}, expected real counts "
            "(integers or floating point)"
        )
    n = patterns.shape[1]
    mask = with_flagged_pixels(
        patterns,
        bad_pixel_mask(parameters),
        source="diffraction patterns",
        advice="mark them in Ptychodus's bad-pixel mask to silence this (not with a Value "
        "Upper Bound or by clipping: either sets them to 0, which the loss then takes as "
        "measured zeros)",
    )
    product = parameters.product
    if getattr(product.metadata, "far_field", True) is False:
        raise ValueError(
            "the product's metadata says near field (far_field = False): TorchPINN's forward "
            "model is far-field (Fraunhofer) only and would reconstruct a wrong image; use a "
            "near-field reconstructor (e.g. pty-chi), or set far field if the data are"
        )
    check_pixel_sizes(product)
    probe = probe_modes(product)
    if probe.ndim != 3 or probe.shape[0] == 0 or probe.shape[1:] != (n, n):
        raise ValueError(
            f"the product's probe is {' x '.join(map(str, probe.shape[-2:]))} px "
            f"({probe.shape[0] if probe.ndim == 3 else 0} mode(s)) but the diffraction patterns "
            f"are {n} x {n}: the probe must match the patterns; build or resample it in "
            "Ptychodus's Probe view, or crop the patterns to the probe's size"
        )
    x, y = object_pixel_positions(product)
    obj = product.object_
    object_guess = None
    if with_object and obj.height_px > 0 and obj.width_px > 0:
        object_guess = np.asarray(obj.get_layers_flattened())
    amplitudes = amplitudes_from_counts(patterns, bad_pixels=mask, clip_negative=True)
    pixel = obj.get_pixel_geometry()
    return PtychoData.from_amplitudes(
        amplitudes,
        x,
        y,
        probe,
        object_guess=object_guess,
        bad_pixels=mask,
        pixel_size_m=(pixel.width_m, pixel.height_m),
        key="counts",
        patterns_first=True,  # Ptychodus's diffraction arrays are (M, N, N) by contract
    )


def check_pixel_sizes(product: Product, tolerance: float = 1e-3) -> None:
    """Refuse an object whose pixels differ in size from the probe's.

    Why: a patch of the object is the probe's N x N pixels; positions are converted to object
    pixels. With other object pixels every patch would be cut at the wrong scale and the
    image would come out wrong without a word (e.g. an object opened from another scan).
    """
    obj = product.object_.get_pixel_geometry()
    probe = product.probes.get_pixel_geometry()
    for axis, a, b in (
        ("width", obj.width_m, probe.width_m),
        ("height", obj.height_m, probe.height_m),
    ):
        if not abs(a - b) <= tolerance * max(abs(a), abs(b)):
            raise ValueError(
                f"the object's pixel {axis} ({a:.6g} m) differs from the probe's ({b:.6g} m): "
                "this reconstructor needs both on one grid; rebuild the object in Ptychodus's "
                "Object view for this probe (or resample the probe), then try again"
            )


def canvas_for(obj: Object, data: PtychoData | None = None) -> CanvasGeometry:
    """The input object's own pixel frame as an engine canvas.

    The reconstruction goes into the product's object array, so that array must exist and
    should hold the scan: an empty object is refused with what to do, and scan positions
    outside it are reported (their part of the image cannot be shown).
    """
    from ..engine.inference import CanvasGeometry

    width, height = int(obj.width_px), int(obj.height_px)
    if width <= 0 or height <= 0:
        raise ValueError(
            f"the product's object is empty ({width} x {height} pixels): the reconstruction "
            "is written into it, so create it first in Ptychodus's Object view (pick a "
            "builder such as Random, or Open File...), then Reconstruct again"
        )
    if data is not None:
        outside = data.outside(width, height)
        if outside.any():
            logger.warning(
                "%d of %d scan positions lie outside the product's object (%d x %d pixels): "
                "their part of the reconstruction is cut off; enlarge the object in "
                "Ptychodus's Object view to see all of it",
                int(outside.sum()),
                outside.size,
                width,
                height,
            )
    return CanvasGeometry(0.0, 0.0, width, height)


def stitched_to_object(stitched: StitchedObject, template: Object) -> Object:
    """The stitched canvas (in ``template``'s pixel frame) as a Ptychodus ``Object``."""
    given = np.asarray(template.get_array())  # (L, H, W)
    # The input's own complex type: a complex64 object stays complex64 (half the memory of
    # complex128, per streamed chunk), a real-valued one becomes complex128.
    dtype = given.dtype if np.iscomplexobj(given) else np.complex128
    array = np.array(given, dtype=dtype, copy=True)
    if array.shape[-2:] != stitched.object.shape:
        raise ValueError(
            f"stitched object has shape {stitched.object.shape}, expected the input object's "
            f"{array.shape[-2:]}"
        )
    covered = stitched.covered
    array[0][covered] = stitched.object[covered]
    for layer in range(1, array.shape[0]):
        array[layer][covered] = 1.0
    return Object(
        array=array,
        pixel_geometry=template.get_pixel_geometry().copy(),
        center=template.get_center().copy(),
        layer_spacing_m=list(template.layer_spacing_m),
    )


def losses_from_history(history: Sequence[Any]) -> list[LossValue]:
    """Training losses per epoch for the GUI's log-scale plot (positive, finite values only)."""
    return [
        LossValue(epoch=int(r.epoch), value=float(r.train_loss))
        for r in history
        if math.isfinite(r.train_loss) and r.train_loss > 0
    ]


def validation_losses(history: Sequence[Any]) -> list[LossValue]:
    return [
        LossValue(epoch=int(r.epoch), value=float(r.val_loss))
        for r in history
        if r.val_loss is not None and math.isfinite(r.val_loss) and r.val_loss > 0
    ]


#: A product probe this close to a model's starting probe (normalised overlap) is taken to be
#: that probe: the model's training scan, or a scan given the same starting probe.
SAME_STARTING_PROBE = 0.999


def result_probes(product: Product, model: TrainedModel) -> ProbeSequence:
    """The probe to hand back with a reconstruction: the model's refined one, else the input's.

    Why: a model trained with probe refinement learnt objects that explain its data through the
    probe it fitted, not through the one the product holds (on the measured Siemens star the
    stored probe left ten times the misfit). Handing that probe back keeps the product's object
    and probe consistent, as Ptychodus's iterative reconstructors do with theirs, and shows the
    user in the Probe view what the fit found. The model keeps its probe normalised, so it is
    scaled to the input probe's total power (the photon budget the product states), on the
    input's pixel geometry. The input's probe is kept when the model's probe was not refined,
    has another size, or the input carries orthogonal probe relaxation (OPR) weights, which a
    single refined mode stack cannot honour, and when the input's probe is not the one the
    refinement started from (another scan: its product must not get the training scan's probe;
    archives from before that probe was recorded cannot tell, and hand theirs back).
    """
    given = product.probes
    if not model.probe_refined:
        return given
    if model.starting_probe is not None:
        from ..engine.inference import probe_overlap

        given_modes = probe_modes(product)
        overlap = probe_overlap(given_modes, model.starting_probe)
        # A product that already holds the refined probe (a rerun of Reconstruct on the
        # product the first run wrote back, or a saved result) is that scan too.
        again = probe_overlap(given_modes, model.probe)
        if (overlap is None or overlap < SAME_STARTING_PROBE) and (
            again is None or again < SAME_STARTING_PROBE
        ):
            logger.warning(
                "the product keeps its own probe: it is not the probe the model's refinement "
                "started from (normalised overlap %s of 1), so this is not the model's training "
                "scan, and the refined probe belongs to that scan",
                "-" if overlap is None else f"{overlap:.3f}",
            )
            return given
    refined = model.probe
    shape = (given.height_px, given.width_px)
    if refined.shape[-2:] != shape or given.get_opr_weights_or_none() is not None:
        logger.info(
            "the model's refined probe (%s) does not replace the product's (%s, %d OPR mode(s))",
            "x".join(map(str, refined.shape)),
            "x".join(map(str, shape)),
            given.num_coherent_modes,
        )
        return given
    power_in = float(np.sum(np.abs(np.asarray(given.get_array())) ** 2))
    power_model = float(np.sum(np.abs(refined.astype(np.complex128)) ** 2))
    if not (math.isfinite(power_in) and power_in > 0 and power_model > 0):
        return given
    array = refined.astype(np.complex128) * math.sqrt(power_in / power_model)
    logger.info(
        "returning the model's refined probe (%d mode(s)) scaled to the product's probe power",
        refined.shape[0],
    )
    return ProbeSequence(
        array=array[np.newaxis].astype(given.dtype, copy=False),
        opr_weights=None,
        pixel_geometry=given.get_pixel_geometry(),
    )


def with_object(
    product: Product,
    obj: Object,
    losses: Sequence[LossValue],
    probes: ProbeSequence | None = None,
) -> Product:
    """``product`` with the reconstruction's object and losses (and probes, when given)."""
    return Product(
        metadata=product.metadata,
        probe_positions=product.probe_positions,
        probes=product.probes if probes is None else probes,
        object_=obj,
        losses=list(losses),
    )


# ----------------------------------------------------------------------------- training data


def load_batch_layout(directory: Path) -> PtychoData:
    """``diffraction.h5`` + ``product.h5`` (the batch layout) read with Ptychodus's readers."""
    from ptychodus.api.io import load_diffraction_data, load_product
    from ptychodus.api.reconstruct import prepare_reconstruct_input

    assembled = load_diffraction_data(directory / DIFFRACTION_FILE)
    product = load_product(directory / PRODUCT_FILE)
    return reconstruct_input_to_data(prepare_reconstruct_input(assembled, product))


def find_training_data(input_path: Path) -> tuple[PtychoData, PtychoData | None, str]:
    """Training (and optional test) data from a file or directory, with a description.

    A directory is searched in this order: ``diffraction.h5`` + ``product.h5`` (batch layout),
    ``train_data.npz`` (with ``test_data.npz`` as validation when present), the only ``*.npz``,
    the newest ``*.npz``.
    """
    from ..engine.data import load_npz

    path = Path(input_path)
    if path.is_file():
        return load_npz(path), None, str(path)
    if not path.is_dir():
        raise FileNotFoundError(f"training data not found: {path} is neither a file nor a folder")
    if (path / DIFFRACTION_FILE).is_file() and (path / PRODUCT_FILE).is_file():
        description = f"{path / DIFFRACTION_FILE} + {path / PRODUCT_FILE}"
        return load_batch_layout(path), None, description
    train_file = path / TRAINING_DATA_NAME
    if train_file.is_file():
        test_file = path / TEST_DATA_NAME
        test = load_npz(test_file) if test_file.is_file() else None
        description = str(train_file) + (f" (validation: {test_file})" if test else "")
        return load_npz(train_file), test, description
    candidates = sorted(
        (p for p in path.glob("*.npz") if p.name != TEST_DATA_NAME),
        key=lambda p: p.stat().st_mtime,
    )
    if not candidates:
        raise FileNotFoundError(
            f"no training data in {path}: expected {DIFFRACTION_FILE} + {PRODUCT_FILE}, "
            f"{TRAINING_DATA_NAME}, or an NPZ file (Processing > Export Training Data...)"
        )
    if len(candidates) > 1:
        logger.warning(
            "%d NPZ files in %s: training on the newest, %s (name one %s to choose)",
            len(candidates),
            path,
            candidates[-1].name,
            TRAINING_DATA_NAME,
        )
    return load_npz(candidates[-1]), None, str(candidates[-1])
