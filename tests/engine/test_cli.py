"""The ptychodus-torch command line, run in-process through main(argv)."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from ptychodus_torch_plugin.engine import cli
from ptychodus_torch_plugin.engine.data import load_npz, save_npz
from ptychodus_torch_plugin.engine.payload import create_training_payload
from ptychodus_torch_plugin.engine.simulate import make_probe, simulate_dataset


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """A tiny N = 32 scan with ground truth (169 patterns)."""
    path = tmp_path_factory.mktemp("data") / "D.npz"
    save_npz(simulate_dataset(N=32, nphotons=1e5, seed=0), path)
    return path


def test_smoke_command_from_the_issue(data_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "D.npz").write_bytes(data_file.read_bytes())
    argv = (
        "train --train_data_file D.npz --test_data_file D.npz --output_dir OUT --max_epochs 1 "
        "--n_images 32 --gridsize 1 --batch_size 4 --accelerator cpu --deterministic "
        "--num-workers 0 --learning-rate 1e-3 --disable_mlflow"
    ).split()
    with pytest.warns(DeprecationWarning) as caught:
        assert cli.main(argv) == 0
    messages = " ".join(str(w.message) for w in caught)
    assert "--n_images" in messages and "--disable_mlflow" in messages
    err = capsys.readouterr().err
    assert "warning: --n_images is deprecated" in err
    assert "warning: --disable_mlflow is deprecated" in err
    out = tmp_path / "OUT"
    assert (out / "wts.h5.zip").is_file()
    assert list((out / "checkpoints").glob("*.ckpt"))
    assert not (out / "logs").exists()  # --disable_mlflow: logger none
    history = json.loads((out / "history.json").read_text())
    assert history["epochs_trained"] == 1 and history["backend"] == "pytorch"
    assert history["sources"]["n_groups"] == "override"
    assert history["sources"]["neighbor_count"] == "default"

    assert cli.main(["inspect", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["backend"] == "pytorch" and shown["verified"] is True
    settings = shown["config"]["config"]
    assert (settings["N"], settings["gridsize"], settings["n_groups"]) == (32, 1, 32)
    assert (settings["batch_size"], settings["logger"], settings["deterministic"]) == (
        4,
        "none",
        True,
    )
    assert settings["enable_progress_bar"] is False  # --disable_mlflow implies --quiet
    assert settings["nphotons"] is None  # measured from the data
    assert shown["config"]["nphotons"] == pytest.approx(load_npz(data_file).mean_photons())


def _train_argv(data_file, out, *extra, gridsize=1, logger="none"):
    """A one-epoch, 16-group training of the small network (``logger=None``: the default)."""
    argv = [
        "train",
        "--train_data_file",
        str(data_file),
        "--output_dir",
        str(out),
        "--max_epochs",
        "1",
        "--n_groups",
        "16",
        "--gridsize",
        str(gridsize),
        "--n-filters-scale",
        "1",  # keeps CI fast
        "--accelerator",
        "cpu",
        "--quiet",
    ]
    if logger is not None:
        argv += ["--logger", logger]
    return [*argv, *extra]


@pytest.mark.parametrize("gridsize", [1, 2])
def test_train_then_infer(data_file, tmp_path, gridsize, capsys):
    out, inf = tmp_path / "train", tmp_path / "infer"
    argv = _train_argv(data_file, out, "--batch_size", "8", gridsize=gridsize, logger=None)
    status = cli.main(argv)
    assert status == 0
    assert capsys.readouterr().out == ""  # --quiet
    assert (out / "wts.h5.zip").is_file()
    assert list((out / "logs").rglob("metrics.csv"))  # default logger: csv
    assert (out / "checkpoints" / "last.ckpt").is_file()

    status = cli.main(
        [
            "infer",
            "--model_path",
            str(out),
            "--test_data",
            str(data_file),
            "--output_dir",
            str(inf),
            "--inference-batch-size",
            "32",
            "--accelerator",
            "cpu",
            "--patch-weighting",
            "uniform" if gridsize == 2 else "probe",
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "groups reconstructed" in printed
    truth = load_npz(data_file).object_guess
    obj = np.load(inf / "object.npy", allow_pickle=False)
    assert obj.dtype == np.complex64 and obj.shape == truth.shape  # the object's frame
    with np.load(inf / "reconstruction.npz", allow_pickle=False) as npz:
        assert np.array_equal(npz["object"], obj)
        assert npz["weights"].shape == truth.shape
        assert (float(npz["origin_x"]), float(npz["origin_y"])) == (0.0, 0.0)
        assert str(npz["backend"]) == "pytorch"
        assert int(npz["n_groups"]) == 169  # default: every pattern
    for png in ("amplitude.png", "phase.png"):
        assert (inf / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((inf / "metrics.json").read_text())
    assert metrics["n_groups"] == 169 and metrics["region_pixels"] > 0
    # The scores are those of the image written, against objectGuess, on the eroded region.
    from ptychodus_torch_plugin.engine.metrics import evaluate, scanned_region

    with np.load(inf / "reconstruction.npz", allow_pickle=False) as npz:
        region = scanned_region(npz["weights"], erode=32 // 8)
    assert metrics["region_pixels"] == int(region.sum())
    expected = evaluate(obj, truth, region).to_dict()
    for key in ("amplitude_ssim", "phase_ssim", "amplitude_psnr", "phase_psnr", "frc50"):
        assert isinstance(metrics[key], float) and np.isfinite(metrics[key])
        assert metrics[key] == pytest.approx(expected[key], rel=1e-6), key


def test_device_alias_maps_to_accelerator_without_overriding():
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--train_data_file", "x.npz", "--device", "cpu"])
    with pytest.warns(DeprecationWarning, match="--device is deprecated"):
        cli._apply_deprecated_train_flags(args)
    payload = create_training_payload(cli.training_overrides(args, 32))
    assert payload.execution.accelerator == "cpu"
    assert payload.sources["accelerator"] == "override"

    args = parser.parse_args(
        ["train", "--train_data_file", "x.npz", "--accelerator", "auto", "--device", "cpu"]
    )
    with pytest.warns(DeprecationWarning, match="ignored"):
        cli._apply_deprecated_train_flags(args)
    assert args.accelerator == "auto"

    args = parser.parse_args(["train", "--train_data_file", "x.npz", "--device", "cuda:0"])
    with pytest.warns(DeprecationWarning):
        cli._apply_deprecated_train_flags(args)
    assert args.accelerator == "cuda"


def test_unset_flags_are_not_overrides():
    args = cli.build_parser().parse_args(["train", "--train_data_file", "x.npz"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation when no deprecated flag is used
        cli._apply_deprecated_train_flags(args)
    assert cli.training_overrides(args, 64) == {"N": 64}
    payload = create_training_payload(cli.training_overrides(args, 64))
    assert payload.grid.neighbor_count == 4 and payload.execution.accelerator == "auto"
    assert payload.sources["epochs"] == "default"

    args = cli.build_parser().parse_args(
        ["train", "--train_data_file", "x.npz", "--disable-checkpointing", "--no-deterministic"]
    )
    overrides = cli.training_overrides(args, 64)
    assert overrides["checkpoint_enable"] is False and overrides["deterministic"] is False


def test_nphotons_0_means_measured_as_in_the_settings_files(data_file, tmp_path):
    """Every shipped settings file has NPhotons = 0 ("measured"); the user guide says to pass
    the same settings as flags, and --nphotons 0 was refused."""
    args = cli.build_parser().parse_args(_train_argv(data_file, tmp_path, "--nphotons", "0"))
    assert "nphotons" not in cli.training_overrides(args, 32)
    args = cli.build_parser().parse_args(_train_argv(data_file, tmp_path, "--nphotons", "2e5"))
    assert cli.training_overrides(args, 32)["nphotons"] == 2e5


def test_model_loss_and_validation_settings_have_flags():
    """Multi-GPU training runs from the command line, not inside Ptychodus: the network
    shape, loss and validation share the Ptychodus settings offer must be settable there."""
    argv = (
        "train --train_data_file x.npz --n-filters-scale 1 --amp-activation silu "
        "--normalization batch --probe-scale 3 --loss mae --validation-fraction 0.1"
    ).split()
    overrides = cli.training_overrides(cli.build_parser().parse_args(argv), 64)
    payload = create_training_payload(overrides)
    assert (payload.model.n_filters_scale, payload.model.amp_activation) == (1, "silu")
    assert payload.model.normalization == "batch" and payload.training.loss == "mae"
    assert (payload.data.probe_scale, payload.data.validation_fraction) == (3.0, 0.1)
    assert all(payload.sources[k] == "override" for k in ("loss", "probe_scale", "normalization"))


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--train_data_file", "x.npz", "--bogus"],
        ["train", "--train_data_file", "x.npz", "--accelerator", "tpu"],
        ["train", "--train_data_file", "x.npz", "--max_epochs", "zero"],
        ["train"],  # --train_data_file is required
        ["infer", "--model_path", "m"],  # --test_data is required
        ["frobnicate"],
        [],
    ],
)
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_missing_files_exit_1_naming_the_path(tmp_path, data_file, capsys):
    missing = tmp_path / "no_such_data.npz"
    assert cli.main(["train", "--train_data_file", str(missing), "--output_dir", "o"]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err

    archive = tmp_path / "no_model"
    argv = ["infer", "--model_path", str(archive), "--test_data", str(data_file)]
    assert cli.main([*argv, "--output_dir", str(tmp_path / "o")]) == 1
    assert str(archive) in capsys.readouterr().err

    assert cli.main(["inspect", str(tmp_path / "x.zip")]) == 1
    assert "x.zip" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_output_paths_of_the_wrong_kind_fail_before_the_work(data_file, tmp_path, capsys):
    folder = tmp_path / "adir"
    folder.mkdir()
    assert cli.main(["simulate", "--output", str(folder), "--N", "32"]) == 1
    err = capsys.readouterr().err
    assert f"--output {folder}: is a folder" in err and "Traceback" not in err
    assert list(folder.iterdir()) == []  # no temp file left behind either

    a_file = tmp_path / "s32.npz"
    a_file.write_bytes(b"not a folder")
    argv = ["infer", "--model_path", str(tmp_path / "m.h5.zip"), "--test_data", str(data_file)]
    assert cli.main([*argv, "--output_dir", str(a_file)]) == 1
    err = capsys.readouterr().err
    assert f"--output_dir {a_file}: exists and is not a folder" in err
    argv = ["train", "--train_data_file", str(data_file), "--output_dir", str(a_file)]
    assert cli.main(argv) == 1
    assert "exists and is not a folder" in capsys.readouterr().err
    assert a_file.read_bytes() == b"not a folder"


def test_other_os_errors_are_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x.npz"))

    monkeypatch.setattr(cli, "_cmd_simulate", refuse)  # the parser binds it when main runs
    assert cli.main(["simulate", "--output", str(tmp_path / "x.npz")]) == 1
    err = capsys.readouterr().err
    assert "simulate: error: [Errno 13] Permission denied" in err and "Traceback" not in err


def test_invalid_settings_exit_1_with_the_message(data_file, tmp_path, capsys):
    argv = ["train", "--train_data_file", str(data_file), "--output_dir", str(tmp_path)]
    assert cli.main([*argv, "--gridsize", "2", "--neighbor_count", "3"]) == 1
    err = capsys.readouterr().err
    assert "neighbor_count = 3 is invalid" in err and "Traceback" not in err


def test_simulate(tmp_path, capsys):
    out = tmp_path / "sim.npz"
    argv = ["simulate", "--output", str(out), "--N", "32", "--nphotons", "1e4"]
    assert cli.main([*argv, "--scan", "fermat", "--probe", "gaussian", "--seed", "3"]) == 0
    data = load_npz(out)
    assert data.N == 32 and data.object_guess is not None
    assert data.mean_photons() == pytest.approx(1e4, rel=0.05)
    assert "wrote" in capsys.readouterr().out

    # From an object/probe/positions file (like shared/data/run1084_object_probe.npz).
    source = tmp_path / "object_probe.npz"
    rng = np.random.default_rng(0)
    obj = np.exp(1j * rng.uniform(0, 1, (80, 80))).astype(np.complex64)
    xs, ys = np.meshgrid(np.arange(16.0, 64.0, 8.0), np.arange(16.0, 64.0, 8.0))
    np.savez(
        source,
        objectGuess=obj,
        probeGuess=make_probe("disk", 32),
        xcoords=xs.ravel(),
        ycoords=ys.ravel(),
    )
    out2 = tmp_path / "from_object.npz"
    argv = ["simulate", "--from-object", str(source), "--output", str(out2), "--quiet"]
    assert cli.main([*argv, "--nphotons", "1e5"]) == 0
    data = load_npz(out2)
    assert data.n_patterns == 36 and data.N == 32
    assert cli.main(["simulate", "--from-object", str(tmp_path / "none.npz")]) == 1
    assert "none.npz" in capsys.readouterr().err


def test_inspect_describes_a_tensorflow_archive(tmp_path, capsys):
    import zipfile

    path = tmp_path / "wts.h5.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("manifest.json", json.dumps({"version": "1.0", "models": ["autoencoder"]}))
        zf.writestr("autoencoder/model.keras", b"keras")
    assert cli.main(["inspect", "--model_path", str(tmp_path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["backend"] == "tensorflow" and "cannot load" in shown["note"]

    argv = ["infer", "--model_path", str(path), "--test_data", str(path), "--output_dir", "o"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "tensorflow backend; this loader is pytorch" in err


def test_infer_phase_alignment_flag():
    parser = cli.build_parser()
    base = ["infer", "--model_path", "m", "--test_data", "t.npz"]
    assert parser.parse_args(base).phase_alignment is None  # not an override: default on
    assert parser.parse_args([*base, "--no-phase-alignment"]).phase_alignment is False


def test_infer_subpixel_flag():
    parser = cli.build_parser()
    base = ["infer", "--model_path", "m", "--test_data", "t.npz"]
    assert parser.parse_args(base).subpixel is None  # not an override: lanczos3 by default
    assert parser.parse_args([*base, "--subpixel", "bilinear"]).subpixel == "bilinear"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--subpixel", "cubic"])


def test_train_final_weights_flag():
    parser = cli.build_parser()
    base = ["train", "--train_data_file", "t.npz", "--output_dir", "o"]
    assert parser.parse_args(base).final_weights is None  # not an override: "best"
    assert parser.parse_args([*base, "--final-weights", "last"]).final_weights == "last"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--final-weights", "middle"])


def test_train_with_probe_refinement_reports_it(data_file, tmp_path, capsys):
    out = tmp_path / "OUT"
    argv = (
        f"train --train_data_file {data_file} --output_dir {out} --max_epochs 1 --n_groups 16 "
        "--n-filters-scale 1 --accelerator cpu --logger none --probe-refinement-epochs 5 "
        "--probe-modes 2"
    ).split()
    assert cli.main(argv) == 0
    assert "probe refinement (2 mode(s), 5 epochs)" in capsys.readouterr().out
    history = json.loads((out / "history.json").read_text())
    refinement = history["probe_refinement"]
    assert (refinement["epochs"], refinement["modes"], refinement["fixed_epochs"]) == (5, 2, 1)
    assert 0 < refinement["misfit_per_pattern_refined"]
    assert history["sources"]["probe_modes"] == "override"
    assert cli.main(["inspect", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["config"]["config"]["probe_refinement_epochs"] == 5
    assert shown["config"]["probe_shape"] == [2, 32, 32]


@pytest.mark.parametrize(
    "strategy, message",
    [
        ("deepspeed", "DeepSpeed installed"),  # Lightning's MisconfigurationException
        ("fsdp", "requires a GPU accelerator"),  # Lightning's ValueError
    ],
)
def test_hardware_settings_lightning_refuses_fail_before_the_probe_refinement(
    data_file, tmp_path, capsys, monkeypatch, strategy, message
):
    """Both used to come after the refinement (minutes), the first as a traceback."""
    from ptychodus_torch_plugin.engine import training

    def refinement_must_not_run(*args, **kwargs):
        raise AssertionError("the probe refinement ran before the settings were checked")

    monkeypatch.setattr(training, "refine_probe", refinement_must_not_run)
    out = tmp_path / "OUT"
    argv = (
        f"train --train_data_file {data_file} --output_dir {out} --max_epochs 1 --n_groups 16 "
        f"--accelerator cpu --logger none --probe-refinement-epochs 50 --strategy {strategy}"
    ).split()
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ptychodus-torch train: error: "), err
    assert message in err[0]
    assert not (out / "wts.h5.zip").exists()


def test_probe_refinement_flags_reject_negative_values(capsys):
    base = ["train", "--train_data_file", "t.npz", "--output_dir", "o"]
    for flag in ("--probe-refinement-epochs", "--probe-modes"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args([*base, flag, "-1"])


def test_train_supervised_mode_from_the_command_line(data_file, tmp_path, capsys):
    """Multi-GPU training of the Supervised reconstructor goes through the CLI too."""
    out = tmp_path / "OUT"
    argv = (
        f"train --train_data_file {data_file} --output_dir {out} --max_epochs 1 --n_groups 16 "
        "--n-filters-scale 1 --accelerator cpu --logger none --mode supervised"
    ).split()
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main(["inspect", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["config"]["config"]["mode"] == "supervised"
    no_truth = tmp_path / "no_truth.npz"
    with np.load(data_file) as arrays:
        np.savez(no_truth, **{k: v for k, v in arrays.items() if k != "objectGuess"})
    argv[argv.index(str(data_file))] = str(no_truth)
    assert cli.main(argv) == 1
    assert "objectGuess: not found" in capsys.readouterr().err


def test_a_diverged_training_exits_3_with_the_archive_or_1_without_one(
    data_file, tmp_path, capsys, monkeypatch
):
    from training_helpers import make_training_diverge

    make_training_diverge(monkeypatch, epoch=2, batch=1)
    out = tmp_path / "OUT"
    argv = (
        f"train --train_data_file {data_file} --output_dir {out} --max_epochs 3 --n_groups 32 "
        "--n-filters-scale 1 --accelerator cpu --logger none --quiet"
    ).split()
    assert cli.main(argv) == cli.DIVERGED_EXIT_STATUS == 3
    history = json.loads((out / "history.json").read_text())
    assert history["epochs_trained"] == 1 and (out / "wts.h5.zip").is_file()
    diverged = history["diverged"]
    assert (diverged["epoch"], diverged["batch"]) == (2, 1)
    assert "epoch 2, batch 1" in diverged["message"]

    make_training_diverge(monkeypatch, epoch=1, batch=1)
    capsys.readouterr()
    assert cli.main([*argv[:4], str(tmp_path / "OUT2"), *argv[5:]]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ptychodus-torch train: error: training diverged")
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "OUT2" / "wts.h5.zip").exists()


@pytest.fixture(scope="module")
def untrained_archive(tmp_path_factory, data_file):
    """An archive of an untrained N = 32, gridsize-1 model (inference only needs one)."""
    import torch
    from engine_helpers import tiny_overrides

    from ptychodus_torch_plugin.engine.archive import save_archive
    from ptychodus_torch_plugin.engine.model import TrainedModel

    torch.manual_seed(0)
    data = load_npz(data_file)
    config = create_training_payload(tiny_overrides(gridsize=1)).to_flat()
    model = TrainedModel.build(
        config, data.probe[0], input_scale=1.0, intensity_scale=1.0, nphotons=1e5
    )
    return save_archive(model, tmp_path_factory.mktemp("model") / "wts.h5.zip")


def _shifted_object_file(data_file, tmp_path, dx):
    """The scan with its positions moved ``dx`` pixels right of objectGuess's frame start."""
    data = load_npz(data_file)
    path = tmp_path / "shifted.npz"
    with np.load(data_file) as raw:
        arrays = dict(raw)
    arrays["xcoords"] = data.xcoords + dx
    np.savez(path, **arrays)
    return path, data.object_guess.shape


def test_infer_reports_positions_outside_the_object_and_never_writes_an_empty_image(
    untrained_archive, data_file, tmp_path, capsys, caplog
):
    """A placeholder objectGuess used to drop every patch off the canvas, exit 0, silently."""
    height, width = load_npz(data_file).object_guess.shape
    # all positions beyond the object's right edge: the image covers the scan, unscored
    path, _ = _shifted_object_file(data_file, tmp_path, dx=width + 100)
    out = tmp_path / "all_out"
    argv = ["infer", "--model_path", str(untrained_archive), "--test_data", str(path)]
    assert cli.main([*argv, "--output_dir", str(out), "--accelerator", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "none of the 169 scan positions lies inside objectGuess" in captured.err
    obj = np.load(out / "object.npy")
    assert np.count_nonzero(obj) > 0.5 * obj.size  # the scan, not an all-zero object frame
    with np.load(out / "reconstruction.npz") as npz:
        assert float(npz["origin_x"]) > width  # the canvas lies where the scan is
    assert not (out / "metrics.json").exists()

    # some positions outside: the object's frame, with a count and what to do
    path, _ = _shifted_object_file(data_file, tmp_path, dx=width / 2)
    out = tmp_path / "some_out"
    argv = ["infer", "--model_path", str(untrained_archive), "--test_data", str(path)]
    assert cli.main([*argv, "--output_dir", str(out), "--accelerator", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "scan positions lie outside objectGuess" in err and "remove objectGuess" in err
    assert np.load(out / "object.npy").shape == (height, width)
    assert "amplitude_ssim" in json.loads((out / "metrics.json").read_text())


def test_writing_images_leaves_the_process_matplotlib_backend_alone(tmp_path):
    """matplotlib.use('Agg') inside the engine switched a notebook's or an application's
    pyplot backend (and closed its figures)."""
    import matplotlib

    from ptychodus_torch_plugin.engine.images import save_object_images

    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # stands for the host's interactive backend
    try:
        obj = np.exp(1j * np.linspace(0, 1, 64)).reshape(8, 8)
        paths = save_object_images(obj, tmp_path, title="t")
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)
    assert [p.name for p in paths] == ["object_amplitude.png", "object_phase.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_a_second_train_into_a_folder_keeps_the_first_model(data_file, tmp_path, capsys):
    """Both runs used to write OUT/wts.h5.zip: the second replaced the first without a word."""
    out = tmp_path / "OUT"
    assert cli.main(_train_argv(data_file, out, "--disable-checkpointing")) == 0
    first = (out / "wts.h5.zip").read_bytes()
    assert cli.main(_train_argv(data_file, out, "--disable-checkpointing", "--seed", "1")) == 0
    (kept,) = out.glob("wts-*.h5.zip")
    assert kept.read_bytes() == first and (out / "wts.h5.zip").read_bytes() != first
    assert len(list(out.glob("history-*.json"))) == 1
    assert f"held an earlier model: kept as {kept.name}" in capsys.readouterr().err


def test_a_folder_that_refuses_the_model_at_the_end_does_not_lose_it(
    data_file, tmp_path, capsys, monkeypatch
):
    """A full disk or a lost mount at the end made `train` exit 1 and discard the model."""
    from ptychodus_torch_plugin.engine import archive

    out, fallback = tmp_path / "OUT", tmp_path / "models"
    monkeypatch.setenv("PTYCHODUS_TORCH_MODEL_DIR", str(fallback))
    assert cli.main(_train_argv(data_file, out, "--disable-checkpointing")) == 0  # an earlier run
    earlier = (out / "wts.h5.zip").read_bytes()
    original = archive.save_archive

    def full_disk(model, target, *args, **kwargs):
        if Path(target).parent == out or Path(target) == out:
            raise OSError(28, "No space left on device")
        return original(model, target, *args, **kwargs)

    monkeypatch.setattr(archive, "save_archive", full_disk)
    assert cli.main(_train_argv(data_file, out, "--disable-checkpointing")) == 0
    (saved,) = fallback.glob("unsaved-*.h5.zip")
    history = saved.with_name(saved.name.replace(".h5.zip", ".history.json"))
    assert json.loads(history.read_text())["archive"] == str(saved)
    assert archive.load_archive(saved).epochs_trained == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and f"saved to {saved} instead" in err
    # The earlier run's files stay as they were, without dated duplicates beside them.
    assert (out / "wts.h5.zip").read_bytes() == earlier and (out / "history.json").is_file()
    assert not list(out.glob("wts-*")) and not list(out.glob("history-*"))


def test_ctrl_c_in_a_dataloader_worker_is_left_to_the_main_process(monkeypatch, capsys):
    """Workers inherit the handler: with --num-workers 2 the stop line was printed 3 times."""
    import signal

    from ptychodus_torch_plugin.engine.cancel import CancelToken

    token = CancelToken()
    with cli._ctrl_c_stops_training(token):
        handler = signal.getsignal(signal.SIGINT)
        real_pid = cli.os.getpid()
        monkeypatch.setattr(cli.os, "getpid", lambda: real_pid + 1)  # as in a worker
        handler(signal.SIGINT, None)
        assert not token.cancelled and capsys.readouterr().err == ""
        monkeypatch.undo()
        handler(signal.SIGINT, None)
        assert token.cancelled and "stopping after this batch" in capsys.readouterr().err


def test_without_torch_inspect_still_works_and_infer_says_how_to_install_it(
    untrained_archive, data_file
):
    """Reading an archive's manifest needs no torch; running the model does, and says so."""
    import subprocess
    import sys

    def run_without_torch(argv):
        code = (
            "import importlib.abc, sys\n"
            "class NoTorch(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch':\n"
            "            raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "from ptychodus_torch_plugin.engine import cli\n"
            f"sys.exit(cli.main({argv!r}))\n"
        )
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    inspected = run_without_torch(["inspect", str(untrained_archive)])
    assert inspected.returncode == 0, inspected.stderr
    assert '"backend": "pytorch"' in inspected.stdout

    inferred = run_without_torch(
        ["infer", "--model_path", str(untrained_archive), "--test_data", str(data_file)]
    )
    assert inferred.returncode == 1, inferred.stderr
    assert "the PyTorch backend is not installed" in inferred.stderr
    assert 'pip install "torch>=2.2"' in inferred.stderr and "Traceback" not in inferred.stderr


def test_ctrl_c_in_train_saves_the_finished_epochs_and_exits_130(
    data_file, tmp_path, capsys, monkeypatch
):
    """Lightning turns a KeyboardInterrupt into sys.exit(1): every finished epoch was lost."""
    import os
    import signal

    class InterruptAfterFirstEpoch(cli._TrainPrinter):
        def on_epoch_end(self, record):
            if record.epoch == 1:
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(cli, "_TrainPrinter", InterruptAfterFirstEpoch)
    before = signal.getsignal(signal.SIGINT)
    out = tmp_path / "OUT"
    argv = _train_argv(data_file, out)
    argv[argv.index("--max_epochs") + 1] = "50"
    assert cli.main(argv) == 130
    assert signal.getsignal(signal.SIGINT) is before  # put back
    history = json.loads((out / "history.json").read_text())
    assert history["cancelled"] is True and 1 <= history["epochs_trained"] <= 2
    assert (out / "wts.h5.zip").is_file()
    assert "stopping after this batch" in capsys.readouterr().err

    class InterruptTwice(cli._TrainPrinter):
        def on_epoch_end(self, record):
            if record.epoch == 1:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)

    # A second Ctrl-C aborts without saving; Lightning's sys.exit(1) becomes 130 here too.
    monkeypatch.setattr(cli, "_TrainPrinter", InterruptTwice)
    aborted = tmp_path / "ABORTED"
    argv[argv.index("--output_dir") + 1] = str(aborted)
    assert cli.main(argv) == 130
    assert not (aborted / "wts.h5.zip").exists()
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before


def test_infer_removes_an_earlier_runs_metrics_when_it_scores_nothing(
    untrained_archive, data_file, tmp_path, capsys
):
    out = tmp_path / "rec"
    argv = ["infer", "--model_path", str(untrained_archive), "--accelerator", "cpu"]
    assert cli.main([*argv, "--test_data", str(data_file), "--output_dir", str(out)]) == 0
    assert (out / "metrics.json").is_file()
    with np.load(data_file) as raw:
        unscored = {k: v for k, v in raw.items() if k != "objectGuess"}
    np.savez(tmp_path / "no_truth.npz", **unscored)
    capsys.readouterr()
    argv += ["--test_data", str(tmp_path / "no_truth.npz"), "--output_dir", str(out)]
    assert cli.main(argv) == 0
    assert not (out / "metrics.json").exists()
    assert "removed an earlier run's metrics.json" in capsys.readouterr().out


def test_mismatched_pattern_sizes_name_the_file_before_any_work(
    untrained_archive, data_file, tmp_path, capsys
):
    other = tmp_path / "N64.npz"
    save_npz(simulate_dataset(N=64, object_shape=(96, 96), nphotons=1e4, seed=1), other)
    argv = _train_argv(data_file, tmp_path / "OUT", "--test_data_file", str(other))
    assert cli.main([*argv, "--probe-refinement-epochs", "5"]) == 1
    err = capsys.readouterr().err
    assert f"{other}: patterns of size 64, but {data_file} has 32" in err
    assert not (tmp_path / "OUT").exists()  # refused before training or refinement
    argv = ["infer", "--model_path", str(untrained_archive), "--test_data", str(other)]
    assert cli.main([*argv, "--output_dir", str(tmp_path / "rec")]) == 1
    assert f"{other}: patterns of size 64, but the model" in capsys.readouterr().err


def test_refused_settings_name_the_flag_typed_and_folders_are_not_files(
    data_file, tmp_path, capsys, monkeypatch
):
    argv = _train_argv(data_file, tmp_path / "OUT")
    assert cli.main([*argv, "--validation-fraction", "0.9"]) == 1
    err = capsys.readouterr().err
    assert "error: --validation-fraction: DataConfig.validation_fraction = 0.9" in err
    # A flag named unlike its field, and a refused pair named as a pair.
    assert cli.main([*argv, "--max_epochs", "200000"]) == 1  # the last --max_epochs counts
    assert "error: --max_epochs: TrainingConfig.epochs = 200000" in capsys.readouterr().err
    assert cli.main([*argv, "--gridsize", "3"]) == 1
    assert "error: --gridsize / --neighbor_count: GridConfig.neighbor_count = 4" in (
        capsys.readouterr().err
    )
    argv = ["train", "--train_data_file", str(tmp_path), "--output_dir", str(tmp_path / "o")]
    assert cli.main(argv) == 1
    assert f"training data file {tmp_path}: is a folder; give the .npz file" in (
        capsys.readouterr().err
    )

    # An output folder that refuses files fails before the work (root can write anywhere,
    # so the refusal is simulated).
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "TemporaryFile", refuse)
    assert cli.main(_train_argv(data_file, tmp_path)) == 1
    assert f"--output_dir {tmp_path}: cannot write there (Permission denied)" in (
        capsys.readouterr().err
    )


def test_a_model_folder_without_wts_names_the_archives_it_holds(
    untrained_archive, tmp_path, capsys
):
    (tmp_path / "model.h5.zip").write_bytes(untrained_archive.read_bytes())
    assert cli.main(["inspect", str(tmp_path)]) == 1
    assert "it holds model.h5.zip: give that file's path" in capsys.readouterr().err


def test_infer_crop_fraction_and_input_normalization_reach_the_engine(
    untrained_archive, data_file, tmp_path, monkeypatch, capsys
):
    """A GUI image made with either setting could not be reproduced from the command line."""
    from ptychodus_torch_plugin.engine import inference

    seen = []

    class Seen(Exception):
        pass

    def record(model, data, payload, canvas=None):
        seen.append(payload)
        raise Seen

    monkeypatch.setattr(inference, "reconstruct", record)
    argv = ["infer", "--model_path", str(untrained_archive), "--test_data", str(data_file)]
    argv += ["--output_dir", str(tmp_path / "o"), "--quiet"]
    with pytest.raises(Seen):
        cli.main([*argv, "--crop-fraction", "0.625", "--input-normalization", "stored"])
    assert seen[-1].inference.crop_fraction == 0.625
    assert seen[-1].data.input_normalization == "stored"
    with pytest.raises(Seen):
        cli.main(argv)
    assert seen[-1].inference.crop_fraction == 0.5
    assert seen[-1].data.input_normalization == "recompute"
    monkeypatch.undo()
    assert cli.main([*argv, "--crop-fraction", "1.5"]) == 1
    assert "--crop-fraction: InferenceConfig.crop_fraction = 1.5" in capsys.readouterr().err


def test_out_of_memory_is_one_line_naming_the_commands_own_flag(tmp_path, capsys, monkeypatch):
    def exhausted(args):
        raise MemoryError("Unable to allocate 13.4 TiB")

    monkeypatch.setattr(cli, "_cmd_infer", exhausted)  # the parser binds it when main runs
    argv = ["infer", "--model_path", "m", "--test_data", "t.npz"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "infer: error: out of memory (Unable to allocate 13.4 TiB)" in err
    assert "--inference-batch-size" in err and "Traceback" not in err


def test_torch_out_of_memory_is_one_line_too(capsys, monkeypatch):
    # torch.OutOfMemoryError is a RuntimeError, not a MemoryError: it used to end in a traceback.
    import torch

    def exhausted(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore")

    monkeypatch.setattr(cli, "_cmd_train", exhausted)
    assert cli.main(["train", "--train_data_file", "t.npz", "--output_dir", "o"]) == 1
    err = capsys.readouterr().err
    assert "train: error: out of memory (CUDA out of memory. Tried to allocate 20.00 GiB)" in err
    assert "--batch_size" in err and "Traceback" not in err
