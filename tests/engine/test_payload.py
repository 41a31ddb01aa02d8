"""Configs and payload factory: channel counts, defaults, precedence, validation messages."""

import pytest

from ptychodus_torch_plugin.engine.config import (
    CheckpointConfig,
    ExecutionConfig,
    GridConfig,
    InferenceConfig,
    TrainingConfig,
)
from ptychodus_torch_plugin.engine.payload import (
    SOURCE_ARCHIVE,
    SOURCE_DEFAULT,
    SOURCE_EXECUTION,
    SOURCE_OVERRIDE,
    create_inference_payload,
    create_training_payload,
)


@pytest.mark.parametrize("gridsize, channels", [(1, 1), (2, 4), (3, 9)])
def test_channel_counts_follow_gridsize_in_every_config(gridsize, channels):
    neighbor_count = max(4, channels)
    train = create_training_payload({"gridsize": gridsize, "neighbor_count": neighbor_count})
    assert train.grid.channels == channels
    assert train.data.channels == channels
    assert train.model.in_channels == channels
    assert train.model.out_channels == channels
    assert train.training.forward_channels == channels
    infer = create_inference_payload({"gridsize": gridsize, "neighbor_count": neighbor_count})
    assert infer.model.in_channels == infer.model.out_channels == channels
    assert infer.inference.channels == channels
    # One GridConfig object shared by all: nothing can disagree.
    assert train.data.grid is train.model.grid is train.training.grid


def test_neighbor_count_defaults_to_four_everywhere():
    assert GridConfig().neighbor_count == 4
    train = create_training_payload({"gridsize": 2})
    infer = create_inference_payload({})
    assert train.grid.neighbor_count == 4 and train.sources["neighbor_count"] == SOURCE_DEFAULT
    assert infer.grid.neighbor_count == 4


@pytest.mark.parametrize("gridsize, k", [(2, 3), (3, 4), (3, 8)])
def test_neighbor_count_below_channels_raises(gridsize, k):
    with pytest.raises(
        ValueError, match=rf"neighbor_count = {k} .*>= gridsize\*\*2 = {gridsize**2}"
    ):
        create_training_payload({"gridsize": gridsize, "neighbor_count": k})


def test_precedence_override_then_execution_then_default():
    execution = ExecutionConfig(learning_rate=5e-4, scheduler="cosine")
    payload = create_training_payload(
        {"scheduler": "plateau", "epochs": 7, "batch_size": None}, execution=execution
    )
    assert payload.execution.scheduler == "plateau"
    assert payload.sources["scheduler"] == SOURCE_OVERRIDE
    assert payload.execution.learning_rate == 5e-4
    assert payload.sources["learning_rate"] == SOURCE_EXECUTION
    assert payload.training.epochs == 7 and payload.sources["epochs"] == SOURCE_OVERRIDE
    # None counts as "not given" (CLI flags left unset).
    assert payload.training.batch_size == 16 and payload.sources["batch_size"] == SOURCE_DEFAULT


def test_inference_payload_takes_geometry_from_archive_unless_overridden(caplog):
    archived = create_training_payload({"gridsize": 2, "N": 32, "neighbor_count": 6}).to_flat()
    payload = create_inference_payload({"inference_batch_size": 8}, archived=archived)
    assert (payload.grid.N, payload.grid.gridsize, payload.grid.neighbor_count) == (32, 2, 6)
    assert payload.sources["gridsize"] == SOURCE_ARCHIVE
    assert payload.execution.inference_batch_size == 8
    with caplog.at_level("WARNING"):
        overridden = create_inference_payload({"gridsize": 1}, archived=archived)
    assert overridden.grid.gridsize == 1 and overridden.sources["gridsize"] == SOURCE_OVERRIDE
    assert "will not fit" in caplog.text


def test_checkpoint_fields_flatten_and_override():
    payload = create_training_payload(
        {"checkpoint_save_top_k": -1, "checkpoint_monitor": "train_loss"}
    )
    assert payload.execution.checkpointing == CheckpointConfig(save_top_k=-1, monitor="train_loss")
    flat = payload.to_flat()
    assert flat["checkpoint_save_top_k"] == -1 and flat["gridsize"] == 1


@pytest.mark.parametrize(
    "overrides, field, allowed",
    [
        ({"accelerator": "tpu"}, "ExecutionConfig.accelerator", "'auto'"),
        ({"precision": "64"}, "ExecutionConfig.precision", "'bf16-mixed'"),
        ({"num_workers": -1}, "ExecutionConfig.num_workers", ">= 0"),
        ({"learning_rate": 0.0}, "ExecutionConfig.learning_rate", "> 0"),
        ({"scheduler": "step"}, "ExecutionConfig.scheduler", "'cosine'"),
        ({"accumulate_grad_batches": 0}, "ExecutionConfig.accumulate_grad_batches", ">= 1"),
        ({"checkpoint_save_top_k": -2}, "CheckpointConfig.save_top_k", ">= -1"),
        ({"checkpoint_mode": "up"}, "CheckpointConfig.mode", "'min'"),
        ({"checkpoint_mode": "max"}, "CheckpointConfig.mode", "'min'"),  # every monitor: a loss
        ({"early_stop_patience": 0}, "ExecutionConfig.early_stop_patience", ">= 1"),
        ({"logger": "wandb"}, "ExecutionConfig.logger", "'tensorboard'"),
        ({"inference_batch_size": 0}, "ExecutionConfig.inference_batch_size", ">= 1"),
        ({"gridsize": 0}, "GridConfig.gridsize", "[1, 4]"),
        ({"N": 48}, "GridConfig.N", "64"),
        ({"epochs": 0}, "TrainingConfig.epochs", "[1, 100000]"),
        ({"amp_activation": "relu"}, "ModelConfig.amp_activation", "'sigmoid'"),
        ({"normalization": "layer"}, "ModelConfig.normalization", "'batch'"),
        ({"nphotons": -5.0}, "DataConfig.nphotons", "> 0"),
        ({"nphotons": float("inf")}, "DataConfig.nphotons", "a finite number > 0"),
        ({"learning_rate": float("inf")}, "ExecutionConfig.learning_rate", "finite"),
        ({"probe_scale": float("nan")}, "DataConfig.probe_scale", "finite"),
        ({"seed": 2**32}, "DataConfig.seed", "[0, 4294967295]"),
        ({"checkpoint_monitor": "val_los"}, "CheckpointConfig.monitor", "'train_loss'"),
        ({"N": 64.0}, "GridConfig.N", "32, 64, 128, 256"),
        ({"deterministic": "yes"}, "ExecutionConfig.deterministic", "True or False"),
    ],
)
def test_invalid_values_name_field_value_and_range(overrides, field, allowed):
    with pytest.raises(ValueError) as info:
        create_training_payload(overrides)
    message = str(info.value)
    assert field in message
    assert repr(next(iter(overrides.values()))) in message
    assert allowed in message


def test_an_unsupported_patch_size_says_to_crop_or_bin():
    with pytest.raises(ValueError, match=r"N = 48 is invalid.*48 x 48 px: crop or bin"):
        create_training_payload({"N": 48})


def test_a_numpy_number_is_refused_with_the_reason():
    """GridConfig(N=np.int64(64)) said "64 is invalid: allowed ... 64"."""
    import numpy as np

    hint = r"as a plain Python value: pass value.item\(\)"
    with pytest.raises(ValueError, match=hint):
        GridConfig(N=np.int64(64))
    with pytest.raises(ValueError, match=hint):
        create_training_payload({"learning_rate": np.float32(1e-3)})
    with pytest.raises(ValueError, match=hint):
        create_training_payload({"deterministic": np.bool_(True)})
    assert GridConfig(N=np.int64(64).item()).N == 64  # the advice works


def test_unknown_setting_is_rejected_by_name():
    with pytest.raises(ValueError, match="unknown training setting.*'gridsise'"):
        create_training_payload({"gridsise": 2})


def test_backend_selection():
    assert TrainingConfig().backend == "pytorch"
    assert InferenceConfig().backend == "pytorch"
    with pytest.raises(ValueError, match="PyTorch backend only"):
        create_training_payload({"backend": "tensorflow"})
    with pytest.raises(ValueError, match="PyTorch backend only"):
        create_inference_payload({"backend": "tensorflow"})
    with pytest.raises(ValueError, match=r"backend = 'jax'"):
        TrainingConfig(backend="jax")


def test_missing_optional_logger_package_names_the_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else real(name, *a),
    )
    with pytest.raises(ValueError, match="pip install tensorboard"):
        create_training_payload({"logger": "tensorboard"})


def test_configs_are_frozen():
    payload = create_training_payload({})
    with pytest.raises(AttributeError):
        payload.training.epochs = 3  # type: ignore[misc]


def test_subpixel_is_lanczos_by_default_and_validated():
    assert create_inference_payload({}).inference.subpixel == "lanczos3"
    assert create_inference_payload({"subpixel": "bilinear"}).inference.subpixel == "bilinear"
    with pytest.raises(ValueError, match=r"InferenceConfig.subpixel.*lanczos3.*bilinear"):
        create_inference_payload({"subpixel": "cubic"})


def test_phase_alignment_is_on_by_default_and_validated():
    assert create_inference_payload({}).inference.phase_alignment is True
    assert create_inference_payload({"phase_alignment": False}).inference.phase_alignment is False
    with pytest.raises(ValueError, match=r"InferenceConfig.phase_alignment.*True or False"):
        create_inference_payload({"phase_alignment": "yes"})
