"""A simulated scan in Ptychodus's batch layout, made with Ptychodus's own simulator and writers.

``python -m ptychodus_torch_plugin.host.demo simulate IN [--settings FILE]`` writes
``IN/diffraction.h5`` and ``IN/product.h5`` (a uniform initial object, the probe and the scan
positions), ``IN/ground_truth.npz`` (the true object, for scoring) and, when given, a copy of
the settings file as ``IN/settings.ini``; then ``ptychodus -b train -i IN -o OUT`` and
``ptychodus -b reconstruct -i IN -o OUT2`` run the plugin end to end.
``python -m ptychodus_torch_plugin.host.demo score OUT2 IN [--images DIR]`` compares the
last reconstruction with the truth and can write ``DIR/object_amplitude.png`` and
``DIR/object_phase.png``. ``python -m ptychodus_torch_plugin.host.demo settings [--copy DIR]``
lists the ready-made settings files installed with the package (or copies them into DIR).

The diffraction patterns come from ``ptychodus.api.simulate.diffraction`` (the host's forward
model, not ours), so the demo and the end-to-end tests also check that the plugin's units,
geometry and conventions agree with Ptychodus.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .shipped_settings import copy_shipped_settings, settings_folder, shipped_settings_file


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-peak smooth random field (Gaussian low-pass of white noise)."""
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.fftfreq(shape[1])[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    field = np.real(np.fft.ifft2(np.fft.fft2(noise) * kernel))
    field -= field.mean()
    return field / (np.abs(field).max() or 1.0)


@dataclass(frozen=True)
class SimulatedScan:
    directory: Path
    n_patterns: int
    N: int  # noqa: N815 - the patch size
    object_shape: tuple[int, int]


def resolve_settings(settings: str | Path) -> Path:
    """A settings file: the path given, or else the ready-made file of that name.

    A local file wins, also over a name given without ``.ini`` (``torchpinn-tiny`` finds an
    edited ``./torchpinn-tiny.ini`` first), so copies made with ``settings --copy .`` are used.
    """
    path = Path(settings)
    if path.is_file():
        return path
    if path.name == str(settings):  # a bare name: a local copy, else a ready-made file
        local = path.with_name(f"{path.name}.ini")
        if path.suffix != ".ini" and local.is_file():
            return local
        try:
            return shipped_settings_file(path.name)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"settings file not found: {settings}; {exc}") from None
    raise FileNotFoundError(f"settings file not found: {settings}")


def simulate_batch_input(
    directory: str | Path,
    *,
    N: int = 32,  # noqa: N803
    scan_points: int = 12,
    step_px: float = 4.0,
    photons: float = 1e6,
    seed: int = 0,
    feature_px: float = 4.0,
    settings: str | Path | None = None,
) -> SimulatedScan:
    """Write a simulated ``scan_points`` x ``scan_points`` raster scan into ``directory``."""
    from ptychodus.api.assemble import AssembledDiffractionData
    from ptychodus.api.geometry import ImageExtent, PixelGeometry
    from ptychodus.api.io import save_diffraction_data, save_product
    from ptychodus.api.object import Object, compute_object_geometry
    from ptychodus.api.probe import Probe, ProbeGeometry, ProbeSequence
    from ptychodus.api.probe_positions import ProbePositionSequence
    from ptychodus.api.product import Product, ProductMetadata
    from ptychodus.api.simulate.diffraction import generate_diffraction_data
    from ptychodus.api.simulate.object import generate_uniform_object
    from ptychodus.api.simulate.probe import generate_disk_probe, rescale_probe_intensity
    from ptychodus.api.simulate.probe_positions import generate_cartesian_probe_positions

    if settings is not None:  # before writing anything
        settings = resolve_settings(settings)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    metadata = ProductMetadata(
        name="torchpinn-demo",
        comments="simulated with ptychodus.api.simulate",
        detector_distance_m=2.0,
        photon_energy_eV=10000.0,
        probe_photon_count=0.0,
        exposure_time_s=0.0,
        mass_attenuation_m2_per_kg=0.0,
        tomography_angle_deg=0.0,
    )
    probe_geometry = ProbeGeometry.from_far_field(
        PixelGeometry(75e-6, 75e-6),
        ImageExtent(N, N),
        wavelength_m=metadata.photon_wavelength_m,
        distance_m=metadata.detector_distance_m,
    )
    pixel_m = probe_geometry.pixel_width_m
    positions = ProbePositionSequence(
        list(
            generate_cartesian_probe_positions(
                scan_points, scan_points, step_px * pixel_m, step_px * pixel_m
            )
        )
    )
    # A disk with a defocus-like quadratic phase: a real, centrosymmetric probe would leave
    # single-pattern phase retrieval the twin-image ambiguity (conjugated, flipped object).
    disk = generate_disk_probe(probe_geometry, radius_m=0.25 * N * pixel_m)
    coords = probe_geometry.get_transverse_coordinates()
    defocus = np.exp(1j * 2.0 * np.pi * (coords.position_r_m / (0.25 * N * pixel_m)) ** 2)
    probe = rescale_probe_intensity(
        Probe(disk.get_array() * defocus, disk.get_pixel_geometry()), 1.0
    )
    probes = ProbeSequence(probe.get_array(), None, probe.get_pixel_geometry())
    geometry = compute_object_geometry(positions, probe_geometry, padding_px=2)
    shape = (geometry.height_px, geometry.width_px)
    amplitude = 0.7 + 0.25 * _smooth_field(rng, shape, sigma=feature_px)
    phase = 1.0 * _smooth_field(rng, shape, sigma=feature_px)
    truth = (amplitude * np.exp(1j * phase)).astype(np.complex128)
    true_object = Object(truth, geometry.get_pixel_geometry(), geometry.get_center())
    product = Product(metadata, positions, probes, true_object, losses=[])
    # Ptychodus's propagator is not unitary: simulate noise-free intensities, scale them to
    # `photons` counts per pattern on average, then draw Poisson counts.
    simulated = generate_diffraction_data(product)
    intensities = np.array(simulated.get_patterns(), dtype=np.float64)
    intensities *= photons / intensities.sum(axis=(1, 2)).mean()
    patterns = np.random.default_rng(seed + 1).poisson(intensities).astype(np.float64)
    bad = np.zeros(patterns.shape[1:], dtype=bool)
    data = AssembledDiffractionData(
        np.asarray(simulated.get_indexes()), patterns, simulated.get_pixel_geometry(), bad
    )
    save_diffraction_data(out / "diffraction.h5", data)
    guess = Product(metadata, positions, probes, generate_uniform_object(geometry), losses=[])
    save_product(out / "product.h5", guess)
    np.savez(
        out / "ground_truth.npz",
        object=truth,
        center_x_m=geometry.center_x_m,
        center_y_m=geometry.center_y_m,
        pixel_width_m=geometry.pixel_width_m,
    )
    if settings is not None:
        shutil.copyfile(settings, out / "settings.ini")
    return SimulatedScan(out, len(positions), N, shape)


def scanned_mask(shape: tuple[int, int], margin: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[margin : shape[0] - margin, margin : shape[1] - margin] = True
    return mask


def phase_correlation(reconstruction: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of the phases inside ``mask`` after removing the global phase.

    0 for a flat (constant) reconstruction, 1 for a perfect one.
    """
    rec, ref = reconstruction[mask], truth[mask]
    offset = np.angle(np.vdot(rec, ref))  # global phase that best aligns rec to ref
    rec_phase = np.angle(rec * np.exp(1j * offset))
    ref_phase = np.angle(ref)
    if np.std(rec_phase) == 0 or np.std(ref_phase) == 0:
        return 0.0
    return float(np.corrcoef(rec_phase, ref_phase)[0, 1])


def amplitude_correlation(reconstruction: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    rec, ref = np.abs(reconstruction[mask]), np.abs(truth[mask])
    if np.std(rec) == 0 or np.std(ref) == 0:
        return 0.0
    return float(np.corrcoef(rec, ref)[0, 1])


def score(
    output_dir: str | Path, input_dir: str | Path, margin: int | None = None
) -> dict[str, float]:
    """Correlations of the last ``product.NNNNNN.h5`` in ``output_dir`` with the truth.

    Only the well-scanned interior counts: ``margin`` pixels (default N/2 + 4) are left out
    on every side.
    """
    from ptychodus.api.io import load_product

    files = sorted(Path(output_dir).glob("product.*.h5"))
    if not files:
        raise FileNotFoundError(f"no product.NNNNNN.h5 in {output_dir}")
    product = load_product(files[-1])
    reconstruction = np.asarray(product.object_.get_layers_flattened())
    truth = np.load(Path(input_dir) / "ground_truth.npz")["object"]
    if margin is None:
        margin = np.shape(product.probes.get_array())[-1] // 2 + 4
    mask = scanned_mask(truth.shape, margin)
    return {
        "phase_correlation": phase_correlation(reconstruction, truth, mask),
        "amplitude_correlation": amplitude_correlation(reconstruction, truth, mask),
        "flat_phase_correlation": phase_correlation(np.ones_like(truth), truth, mask),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptychodus_torch_plugin.host.demo")
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("simulate", help="write diffraction.h5 + product.h5 into IN")
    sim.add_argument("directory", type=Path)
    sim.add_argument(
        "--settings",
        help="a settings file, or a ready-made one's name (torchpinn-tiny.ini); "
        "copied to IN/settings.ini",
    )
    sim.add_argument("--N", type=int, default=32)
    sim.add_argument("--scan-points", type=int, default=12)
    sim.add_argument("--seed", type=int, default=0)
    sc = commands.add_parser("score", help="compare OUT's last product with IN's truth")
    sc.add_argument("output_dir", type=Path)
    sc.add_argument("input_dir", type=Path)
    sc.add_argument("--images", type=Path, help="write object_{amplitude,phase}.png into DIR")
    ready = commands.add_parser(
        "settings", help="list the ready-made settings files (or copy them: --copy DIR)"
    )
    ready.add_argument("--copy", type=Path, metavar="DIR", help="copy them into DIR to edit")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (OSError, ValueError) as exc:  # one line saying what is wrong, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "simulate":
        scan = simulate_batch_input(
            args.directory,
            N=args.N,
            scan_points=args.scan_points,
            seed=args.seed,
            settings=args.settings,
        )
        print(f"wrote {scan.n_patterns} patterns ({scan.N} px) into {scan.directory}")
        return 0
    if args.command == "settings":
        if args.copy is None:
            for file in sorted(settings_folder().glob("*.ini")):
                print(file)
            return 0
        written = copy_shipped_settings(args.copy)
        for file in written:
            print(f"wrote {file}")
        kept = sorted(settings_folder().glob("*.ini"))
        if len(written) < len(kept):
            print(f"kept {len(kept) - len(written)} file(s) already in {args.copy}")
        return 0
    result = score(args.output_dir, args.input_dir)
    print(json.dumps(result, indent=2))
    if args.images is not None:
        from ptychodus.api.io import load_product

        from ..engine.images import save_object_images

        last = sorted(Path(args.output_dir).glob("product.*.h5"))[-1]
        obj = np.asarray(load_product(last).object_.get_layers_flattened())
        for path in save_object_images(obj, args.images, title="TorchPINN"):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
