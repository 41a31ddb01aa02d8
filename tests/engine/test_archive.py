"""Model archive wts.h5.zip: round trip, integrity, refusal of foreign or unsafe content."""

import copy
import dataclasses
import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
from engine_helpers import tiny_overrides

from ptychodus_torch_plugin.engine import archive as archive_module
from ptychodus_torch_plugin.engine.archive import (
    ARCHIVE_NAME,
    inspect_archive,
    load_archive,
    read_manifest,
    read_summary_documents,
    save_archive,
)
from ptychodus_torch_plugin.engine.model import EpochRecord, TrainedModel
from ptychodus_torch_plugin.engine.payload import create_training_payload
from ptychodus_torch_plugin.engine.simulate import make_probe


def _model(gridsize=2, neighbor_count=5, seed=0, **overrides):
    torch.manual_seed(seed)
    config = create_training_payload(
        tiny_overrides(gridsize=gridsize, neighbor_count=neighbor_count, **overrides)
    ).to_flat()
    history = [
        EpochRecord(1, 10.5, 11.0, 1e-3, 0.25),
        EpochRecord(2, 9.5, None, 5e-4, 0.5),
    ]
    return TrainedModel.build(
        config,
        make_probe("disk", 32),
        input_scale=1.25,
        intensity_scale=3.5,
        nphotons=1e5,
        history=history,
        training_device="cpu",
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = _model()
    path = save_archive(model, tmp_path_factory.mktemp("archive"))
    return model, path


def _rewrite(
    src, dst, *, replace=None, drop=(), update_sha=True, extra=None, compression=zipfile.ZIP_STORED
):
    """Copy an archive, replacing/dropping members; optionally keep the manifest consistent.

    A name in ``replace`` that the archive lacks is added (and listed, with ``update_sha``).
    """
    replace = dict(replace or {})
    with zipfile.ZipFile(src) as zin:
        members = {name: zin.read(name) for name in zin.namelist()}
    members.update(replace)
    for name in drop:
        members.pop(name)
    members.update(extra or {})
    if update_sha:
        manifest = json.loads(members["manifest.json"])
        for name in replace:
            manifest["sha256"][name] = archive_module._sha256(members[name])
        members["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(dst, "w", compression=compression) as zout:
        for name, data in members.items():
            zout.writestr(name, data)
    return dst


# ----------------------------------------------------------------------------- round trip
def test_round_trip_identical_predictions_and_settings(saved, tmp_path):
    model, path = saved
    assert path.name == ARCHIVE_NAME
    for where in (path, path.parent):  # the file, or the directory holding it
        loaded = load_archive(where)
        inputs = torch.rand(5, 4, 32, 32, generator=torch.Generator().manual_seed(1))
        assert np.abs(loaded.predict(inputs) - model.predict(inputs)).max() == 0.0
        offsets = torch.randn(5, 4, 2, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            _, amp_a = model.autoencoder.eval()(inputs, offsets)
            _, amp_b = loaded.autoencoder(inputs, offsets)
        assert torch.equal(amp_a, amp_b)
        assert np.array_equal(loaded.probe, model.probe)
        assert loaded.probe.dtype == np.complex64
        assert (loaded.N, loaded.gridsize, loaded.config["neighbor_count"]) == (32, 2, 5)
        assert loaded.config == model.config
        assert loaded.history == model.history
        assert loaded.history[1].val_loss is None
        assert (loaded.input_scale, loaded.intensity_scale, loaded.nphotons) == (1.25, 3.5, 1e5)
        assert loaded.backend == "pytorch"
    # The archive's geometry feeds the inference payload.
    payload = loaded.inference_payload()
    assert (payload.grid.N, payload.grid.gridsize, payload.grid.neighbor_count) == (32, 2, 5)
    assert payload.sources["neighbor_count"] == "archive"


def test_batch_normalized_model_round_trip_keeps_running_statistics(tmp_path):
    model = _model(normalization="batch")
    model.generator.train()
    with torch.no_grad():  # move the running statistics away from their initial values
        model.generator(torch.rand(8, 4, 32, 32, generator=torch.Generator().manual_seed(3)))
    loaded = load_archive(save_archive(model, tmp_path))
    assert loaded.config["normalization"] == "batch"
    inputs = torch.rand(5, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    assert np.abs(loaded.predict(inputs) - model.predict(inputs)).max() == 0.0
    stats = {k: v for k, v in loaded.generator.state_dict().items() if "running_mean" in k}
    assert stats and all(v.abs().sum() > 0 for v in stats.values())


def test_save_to_explicit_file_name(tmp_path):
    path = save_archive(_model(gridsize=1, neighbor_count=4), tmp_path / "sub" / "my.zip")
    assert path == tmp_path / "sub" / "my.zip" and path.is_file()
    assert load_archive(path).gridsize == 1


def test_manifest_and_inspect(saved):
    model, path = saved
    manifest = read_manifest(path)
    assert manifest["backend"] == "pytorch"
    assert manifest["models"] == ["diffraction_to_obj", "autoencoder"]
    assert manifest["format_version"] == 1
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        dill_copy = pickle.loads(zf.read("manifest.dill"))
    assert set(manifest["sha256"]) == names - {"manifest.json"}
    # The compatibility copy is the same plain dict (less its own hash).
    expected = {**manifest, "sha256": dict(manifest["sha256"])}
    expected["sha256"].pop("manifest.dill")
    assert dill_copy == expected

    info = inspect_archive(path)
    assert info["backend"] == "pytorch" and info["verified"] is True
    assert info["config"]["config"]["gridsize"] == 2
    assert [r["epoch"] for r in info["config"]["history"]] == [1, 2]
    assert "sign_conventions" in info["config"]
    json.dumps(info)  # printable as JSON


# ----------------------------------------------------------------------------- refusals
def _tensorflow_archive(path, with_json=True):
    manifest = {"models": ["autoencoder", "diffraction_to_obj"], "version": "1.0"}
    with zipfile.ZipFile(path, "w") as zf:
        if with_json:
            zf.writestr("manifest.json", json.dumps(manifest))
        else:
            zf.writestr("manifest.dill", pickle.dumps(manifest, protocol=2))
        zf.writestr("autoencoder/model.keras", b"PK-keras-bytes")
        zf.writestr("diffraction_to_obj/model.keras", b"PK-keras-bytes")
        zf.writestr("autoencoder/params.dill", b"not read")
    return path


def test_the_summary_documents_are_the_manifest_and_the_config_document(saved, tmp_path):
    model, file = saved
    manifest, document = read_summary_documents(file)
    assert manifest == read_manifest(file)
    assert document["config"]["N"] == model.config["N"]
    assert len(document["history"]) == len(model.history)
    assert read_summary_documents(file.parent) == (manifest, document)  # the folder works too
    with pytest.raises(FileNotFoundError, match="model archive not found"):
        read_summary_documents(tmp_path / "nowhere.h5.zip")


@pytest.mark.parametrize("member", ["manifest.json", "config.json"])
def test_json_nested_too_deep_is_named_not_a_recursion_error(saved, tmp_path, member):
    # config.json's checksum is updated, so that the loader reaches its parsing
    deep = _rewrite(
        saved[1],
        tmp_path / "deep.zip",
        replace={member: b"[" * 200_000},
        update_sha=member != "manifest.json",
    )
    for read in (load_archive, read_summary_documents):
        with pytest.raises(ValueError, match=rf"{member}.*not valid JSON"):
            read(deep)


@pytest.mark.parametrize("with_json", [True, False], ids=["manifest.json", "manifest.dill"])
def test_tensorflow_archive_is_refused_naming_both_backends(tmp_path, with_json):
    path = _tensorflow_archive(tmp_path / "wts.h5.zip", with_json)
    with pytest.raises(ValueError, match="tensorflow backend; this loader is pytorch") as info:
        load_archive(path)
    assert "retrain" in str(info.value)
    assert read_manifest(path)["backend"] == "tensorflow"
    described = inspect_archive(tmp_path)
    assert described["backend"] == "tensorflow" and described["config"] is None
    assert "cannot load" in described["note"]


class _Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("with_json", [False, True], ids=["dill-only", "dill-beside-json"])
def test_malicious_manifest_dill_never_runs(saved, tmp_path, with_json):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"backend": "pytorch", "payload": _Exploit(marker)}, protocol=2)
    path = tmp_path / "evil.zip"
    if with_json:  # a tampered compatibility copy inside a real archive: caught by sha256
        _rewrite(saved[1], path, replace={"manifest.dill": evil}, update_sha=False)
        with pytest.raises(ValueError, match="sha256 mismatch for member 'manifest.dill'"):
            load_archive(path)
    else:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("manifest.dill", evil)
        for call in (load_archive, read_manifest, inspect_archive):
            with pytest.raises(ValueError, match="refus"):
                call(path)
    assert not marker.exists()


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.zip"):
        load_archive(tmp_path / "nothere.zip")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / ARCHIVE_NAME)):
        load_archive(tmp_path)  # a directory without wts.h5.zip
    with pytest.raises(FileNotFoundError):
        inspect_archive(tmp_path / "nothere.zip")


def test_an_archive_we_may_not_read_is_not_called_corrupt(saved, monkeypatch):
    """A shared archive without read permission: 're-copy it, it may be corrupt' misleads."""
    path = saved[1]

    def refuse(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(archive_module.zipfile, "ZipFile", refuse)  # root reads anything
    with pytest.raises(PermissionError, match="Permission denied") as info:
        load_archive(path)
    assert "corrupt" not in str(info.value) and str(path) in str(info.value)


def test_truncated_and_corrupt_zips(saved, tmp_path):
    data = saved[1].read_bytes()
    cases = {
        "truncated.zip": data[: len(data) // 2],
        "garbage.zip": b"this is not a zip file at all" * 10,
        "empty.zip": b"",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match="not a valid or complete model archive"):
            load_archive(path)
    # Damage inside a member's compressed bytes (the central directory still reads).
    with zipfile.ZipFile(saved[1]) as zf:
        info = zf.getinfo("autoencoder/weights.safetensors")
    damaged = bytearray(data)
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for i in range(start + 64, start + 96):
        damaged[i] ^= 0xFF
    path = tmp_path / "damaged.zip"
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="not a valid or complete|sha256 mismatch"):
        load_archive(path)


def test_sha256_mismatch_names_the_member(saved, tmp_path):
    config = json.loads(zipfile.ZipFile(saved[1]).read("config.json"))
    config["input_scale"] = 99.0
    path = _rewrite(
        saved[1],
        tmp_path / "x.zip",
        replace={"config.json": json.dumps(config).encode()},
        update_sha=False,
    )
    with pytest.raises(ValueError, match="sha256 mismatch for member 'config.json'"):
        load_archive(path)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        inspect_archive(path)


@pytest.mark.parametrize(
    "member", ["probe.npy", "autoencoder/weights.safetensors", "config.json", "manifest.json"]
)
def test_missing_member_is_named(saved, tmp_path, member):
    path = _rewrite(saved[1], tmp_path / "x.zip", drop=[member], update_sha=False)
    with pytest.raises(ValueError, match=f"'{member}' is missing"):
        load_archive(path)


def test_weights_that_do_not_fit_are_refused(saved, tmp_path):
    with zipfile.ZipFile(saved[1]) as zf:
        document = json.loads(zf.read("config.json"))
    document["config"]["n_filters_scale"] = 2  # a wider network than the stored weights
    path = _rewrite(
        saved[1], tmp_path / "x.zip", replace={"config.json": json.dumps(document).encode()}
    )
    with pytest.raises(ValueError, match="do not fit.*shape/dtype mismatch"):
        load_archive(path)


def test_probe_is_read_without_pickle(saved, tmp_path):
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    path = _rewrite(saved[1], tmp_path / "x.zip", replace={"probe.npy": buffer.getvalue()})
    with pytest.raises(ValueError, match="probe.npy"):
        load_archive(path)


@pytest.mark.parametrize(
    ("mode", "epochs", "refined"),
    [("pinn", 0, False), ("pinn", 20, True), ("supervised", 20, False)],
)
def test_archive_says_whether_its_probe_was_refined(tmp_path, mode, epochs, refined):
    """The host hands a refined probe back to Ptychodus; the archive must keep the fact."""
    model = _model(mode=mode, probe_refinement_epochs=epochs)
    assert model.probe_refined is refined
    assert load_archive(save_archive(model, tmp_path)).probe_refined is refined


def test_the_probe_a_refinement_started_from_is_kept(tmp_path):
    """It tells the training scan from others, whose products keep their own probe."""
    model = _model(probe_refinement_epochs=20)
    assert load_archive(save_archive(model, tmp_path / "plain.zip")).starting_probe is None
    model.starting_probe = make_probe("gaussian", 32)[None].astype(np.complex64)
    loaded = load_archive(save_archive(model, tmp_path / "refined.zip"))
    np.testing.assert_array_equal(loaded.starting_probe, model.starting_probe)
    assert "starting_probe.npy" in zipfile.ZipFile(tmp_path / "refined.zip").namelist()


def test_the_training_scans_pixel_size_is_kept(tmp_path):
    model = _model()
    assert load_archive(save_archive(model, tmp_path / "unsized.zip")).pixel_size_m is None
    model.pixel_size_m = (7.5e-9, 7.5e-9)
    assert load_archive(save_archive(model, tmp_path / "sized.zip")).pixel_size_m == (
        7.5e-9,
        7.5e-9,
    )


def _with_config(src, dst, change):
    """A copy of archive ``src`` whose stored flat config is ``change(config)``."""
    document = json.loads(zipfile.ZipFile(src).read("config.json"))
    document["config"] = change(dict(document["config"]))
    return _rewrite(src, dst, replace={"config.json": json.dumps(document).encode()})


def test_archive_without_the_refinement_key_reads_as_not_refined(tmp_path):
    """Archives written before probe refinement existed hold no probe_refinement_epochs."""
    model = _model(probe_refinement_epochs=20)
    path = save_archive(model, tmp_path)
    assert load_archive(path).probe_refined
    older = _with_config(
        path,
        tmp_path / "older.zip",
        lambda c: {k: v for k, v in c.items() if k != "probe_refinement_epochs"},
    )
    assert not load_archive(older).probe_refined


def test_an_older_archive_with_settings_since_refused_still_loads(saved, tmp_path, caplog):
    """A how-it-was-trained setting a later version tightened or retired drops, with a warning.

    Before, ``checkpoint_mode = 'max'`` (a CLI choice until it was refused) or a seed beyond
    2**32 made the archive unloadable: "config.json cannot rebuild the model".
    """
    model, path = saved

    def older(config):
        return {**config, "checkpoint_mode": "max", "seed": 2**33, "retired_option": 3}

    old = _with_config(path, tmp_path / "old.zip", older)
    with caplog.at_level("WARNING"):
        loaded = load_archive(old)
    warned = caplog.text
    assert "3 training setting(s)" in warned
    for name in ("checkpoint_mode = 'max'", "seed = 8589934592", "retired_option = 3"):
        assert name in warned
    assert "checkpoint_mode" not in loaded.config and "retired_option" not in loaded.config
    assert loaded.model_config == model.model_config
    inputs = np.random.default_rng(0).random((2, 4, 32, 32), dtype=np.float32)
    np.testing.assert_array_equal(loaded.predict(inputs), model.predict(inputs))
    # A setting the network is built from is not dropped: that archive cannot load.
    broken = _with_config(path, tmp_path / "broken.zip", lambda c: {**c, "N": 48})
    with pytest.raises(ValueError, match="cannot rebuild the model.*N"):
        load_archive(broken)


def test_an_encrypted_or_foreign_zip_is_refused_with_what_it_is(saved, tmp_path):
    from archive_helpers import encrypted_copy

    encrypted = encrypted_copy(saved[1], tmp_path / "encrypted.zip")
    for read in (load_archive, read_manifest, inspect_archive):
        with pytest.raises(ValueError, match="is encrypted"):
            read(encrypted)
    foreign = tmp_path / "extension.zip"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("manifest.json", json.dumps({"manifest_version": 3, "name": "an add-on"}))
        zf.writestr("background.js", "x")
    for read in (load_archive, inspect_archive):
        with pytest.raises(ValueError, match="not a PtychoPINN model archive"):
            read(foreign)


def test_archive_names_any_case_of_zip_and_a_missing_name_suggests_the_archive(tmp_path):
    model = _model(gridsize=1, neighbor_count=4)
    path = save_archive(model, tmp_path / "model.ZIP")
    assert path == tmp_path / "model.ZIP" and path.is_file()
    save_archive(model, tmp_path / "wts.h5.zip")
    with pytest.raises(FileNotFoundError, match=r"did you mean .*wts\.h5\.zip"):
        load_archive(tmp_path / "wts.h5")


@pytest.mark.parametrize("logger", ["tensorboard", "mlflow"])
def test_a_model_trained_with_a_logger_missing_here_still_loads(saved, tmp_path, logger):
    """Trained on a cluster with TensorBoard, used at a beamline without it."""
    import importlib.util

    from ptychodus_torch_plugin.engine.config import LOGGER_PACKAGES

    if importlib.util.find_spec(LOGGER_PACKAGES[logger]) is not None:
        pytest.skip(f"{logger} is installed here")
    model = dataclasses.replace(saved[0], config={**saved[0].config, "logger": logger})
    loaded = load_archive(save_archive(model, tmp_path))
    assert loaded.config["logger"] == logger
    assert loaded.model_config == saved[0].model_config
    inputs = np.zeros((2, 4, 32, 32), np.float32)
    np.testing.assert_array_equal(loaded.predict(inputs), saved[0].predict(inputs))
    # Training with it here still says what to install.
    with pytest.raises(ValueError, match=f"logger = '{logger}' needs"):
        create_training_payload(loaded.config)


# ----------------------------------------------------------------------------- damaged content
GENERATOR_MEMBER = "diffraction_to_obj/weights.safetensors"
AUTOENCODER_MEMBER = "autoencoder/weights.safetensors"


def _with_manifest(src, dst, change):
    """A copy of archive ``src`` whose manifest.json is ``change(manifest)`` (it lists no hash
    of itself, so the other members still verify)."""
    manifest = json.loads(zipfile.ZipFile(src).read("manifest.json"))
    return _rewrite(
        src, dst, replace={"manifest.json": json.dumps(change(manifest)).encode()}, update_sha=False
    )


def _with_weights(src, dst, model):
    """A copy of archive ``src`` holding ``model``'s weights (written as save_archive would,
    also when save_archive would refuse them)."""
    replace = {
        GENERATOR_MEMBER: archive_module._tensor_bytes(model.generator.state_dict()),
        AUTOENCODER_MEMBER: archive_module._tensor_bytes(model.autoencoder.state_dict()),
    }
    return _rewrite(src, dst, replace=replace)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_are_refused_as_diverged_not_as_inconsistent(saved, tmp_path, bad):
    """torch.equal(NaN, NaN) is False: such an archive was called 'inconsistent' before."""
    diverged = copy.deepcopy(saved[0])
    key, weight = next(iter(diverged.generator.named_parameters()))
    with torch.no_grad():
        weight[(0,) * weight.ndim] = bad  # the autoencoder holds this tensor: both copies agree
    path = _with_weights(saved[1], tmp_path / "diverged.zip", diverged)
    with pytest.raises(ValueError, match="non-finite weights") as info:
        load_archive(path)
    message = str(info.value)
    assert f"'{GENERATOR_MEMBER}'" in message and f"'{key}'" in message
    assert "diverged" in message and "lower learning rate" in message
    assert "inconsistent" not in message
    # ...and no such archive is written in the first place.
    with pytest.raises(ValueError, match=f"weight '{key}'.*NaN or inf.*lower learning rate"):
        save_archive(diverged, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weight_copies_that_disagree_are_still_refused(saved, tmp_path):
    changed = copy.deepcopy(saved[0])
    key, weight = next(iter(changed.generator.named_parameters()))
    with torch.no_grad():
        weight[(0,) * weight.ndim] += 1.0
    replace = {GENERATOR_MEMBER: archive_module._tensor_bytes(changed.generator.state_dict())}
    path = _rewrite(saved[1], tmp_path / "x.zip", replace=replace)
    with pytest.raises(ValueError, match=f"disagree on weight '{key}'.*inconsistent"):
        load_archive(path)


def test_weight_copies_compare_bit_for_bit_so_nan_equals_itself():
    real = torch.tensor([1.0, float("nan"), -0.0])
    assert not torch.equal(real, real.clone())  # why torch.equal cannot compare the copies
    assert archive_module._same_bits(real, real.clone())
    assert not archive_module._same_bits(real, torch.tensor([1.0, float("nan"), 0.0]))
    packed = torch.tensor([[1 + 2j, complex("nan+1j")]], dtype=torch.complex64)
    assert archive_module._same_bits(packed, packed.clone())
    assert not archive_module._same_bits(packed, packed.conj().resolve_conj())
    assert not archive_module._same_bits(real, real.double())


def _zeros(size):
    return bytes(size)  # zeros: a few kilobytes deflated, the cap's size inflated


@pytest.mark.parametrize(
    ("member", "also_inspect"),
    [
        ("config.json", True),
        ("probe.npy", True),
        (GENERATOR_MEMBER, False),  # sized by the network config.json rebuilds
        ("notes/added_by_a_newer_version.bin", False),  # listed, not used: still capped
    ],
)
def test_a_member_that_inflates_beyond_its_cap_is_refused_by_name(
    saved, tmp_path, monkeypatch, member, also_inspect
):
    """A zip bomb: only the manifests were capped, every other member was inflated whole."""
    if member == GENERATOR_MEMBER:
        cap = archive_module._weights_cap(saved[0].generator)[0]
    else:
        if member.startswith("notes/"):  # the generic cap is 2 GiB: test a smaller one
            monkeypatch.setattr(archive_module, "_MAX_WEIGHTS_MEMBER", 1 << 20)
        cap = archive_module._member_cap(member)[0]
    path = _rewrite(
        saved[1],
        tmp_path / "bomb.zip",
        replace={member: _zeros(cap + 1)},
        compression=zipfile.ZIP_DEFLATED,
    )
    assert zipfile.ZipFile(path).getinfo(member).compress_size < cap // 100  # small on disk
    pattern = f"member '{member}' inflates to {cap + 1} bytes, more than the {cap} allowed"
    with pytest.raises(ValueError, match=pattern):
        load_archive(path)
    if also_inspect:
        with pytest.raises(ValueError, match=pattern):
            inspect_archive(path)


def test_a_member_at_its_cap_is_not_refused_for_its_size(saved, tmp_path, monkeypatch):
    """The caps bound, they do not reject what fits: a member of exactly its cap loads,
    one byte more is refused; and the network's own weights fit the cap sized from it."""
    member = "notes/added_by_a_newer_version.bin"  # verified, not used: any bytes will do
    monkeypatch.setattr(archive_module, "_MAX_WEIGHTS_MEMBER", 1 << 16)
    cap = archive_module._member_cap(member)[0]
    assert cap == 1 << 16
    at_cap = _rewrite(saved[1], tmp_path / "at_cap.zip", replace={member: _zeros(cap)})
    loaded = load_archive(at_cap)
    inputs = np.zeros((2, 4, 32, 32), np.float32)
    np.testing.assert_array_equal(loaded.predict(inputs), saved[0].predict(inputs))
    over = _rewrite(saved[1], tmp_path / "over.zip", replace={member: _zeros(cap + 1)})
    with pytest.raises(ValueError, match=f"inflates to {cap + 1} bytes, more than the {cap}"):
        load_archive(over)
    weights_cap, why = archive_module._weights_cap(saved[0].generator)
    with zipfile.ZipFile(saved[1]) as zf:
        stored = zf.getinfo(GENERATOR_MEMBER).file_size
    assert stored <= weights_cap and "config.json" in why
    assert archive_module._MAX_PROBE_MEMBER > 8 * 256 * 256 * 8  # MAX_PROBE_MODES at N = 256


def test_a_member_that_lies_about_its_size_is_never_inflated_whole(saved, tmp_path):
    """The cap compared the size a zip *declares*; zipfile.read then inflated up to a
    gigabyte per step before trimming to it. Here manifest.json declares 200 bytes and
    deflates to 64 MiB: every reader refuses it while holding a few megabytes at most."""
    import tracemalloc

    from archive_helpers import with_declared_size

    manifest = zipfile.ZipFile(saved[1]).read("manifest.json")
    bomb = _rewrite(
        saved[1],
        tmp_path / "bomb.zip",
        replace={"manifest.json": manifest + b" " * (64 << 20)},
        update_sha=False,
        compression=zipfile.ZIP_DEFLATED,
    )
    forged = with_declared_size(bomb, tmp_path / "forged.zip", "manifest.json", 200)
    assert zipfile.ZipFile(forged).getinfo("manifest.json").file_size == 200
    for read in (load_archive, read_manifest, inspect_archive, read_summary_documents):
        tracemalloc.start()
        try:
            # stopped at the declared 200 bytes, where zipfile's checksum of the member fails
            with pytest.raises(ValueError, match=rf"{forged} is not a valid or complete.*CRC"):
                read(forged)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 << 20, f"{read.__name__} held {peak / 2**20:.0f} MiB"


def test_a_member_compressed_by_another_method_is_refused_naming_it(saved, tmp_path):
    """zipfile inflates bzip2 and LZMA members with no bound at all; this writer never uses
    them, so a repacked archive is refused before anything is inflated."""
    repacked = _rewrite(
        saved[1], tmp_path / "repacked.zip", update_sha=False, compression=zipfile.ZIP_BZIP2
    )
    for read in (load_archive, read_manifest, inspect_archive, read_summary_documents):
        with pytest.raises(ValueError, match=r"member 'manifest.json' is compressed with zip "):
            read(repacked)


@pytest.mark.parametrize(
    "complex_keys",
    ["5", '"weights"', "[1]", '["no.such.tensor"]', '["FIRST"]', '["FIRST", "FIRST"]', "{x"],
)
def test_malformed_complex_keys_metadata_is_refused_naming_the_member(
    saved, tmp_path, complex_keys
):
    """It used to raise a bare TypeError or RuntimeError, or to be ignored."""
    from safetensors.torch import save as safetensors_save

    state = {k: v.contiguous() for k, v in saved[0].generator.state_dict().items()}
    # FIRST: a real tensor whose last dimension is not 2 (a view_as_real tensor's always is)
    first = next(k for k, v in state.items() if v.ndim and v.shape[-1] != 2)
    complex_keys = complex_keys.replace("FIRST", first)
    blob = safetensors_save(state, metadata={"complex_keys": complex_keys})
    path = _rewrite(saved[1], tmp_path / "x.zip", replace={GENERATOR_MEMBER: blob})
    with pytest.raises(ValueError, match=f"member '{GENERATOR_MEMBER}' is not valid safetensors"):
        load_archive(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("input_scale", float("nan")),
        ("intensity_scale", float("inf")),
        ("input_scale", -1.25),
        ("intensity_scale", 0.0),
        ("nphotons", float("-inf")),
    ],
)
def test_normalisation_constants_must_be_finite_and_positive(saved, tmp_path, field, value):
    """JSON reads NaN and Infinity; they used to load and give NaN reconstructions."""
    document = json.loads(zipfile.ZipFile(saved[1]).read("config.json"))
    document[field] = value
    path = _rewrite(
        saved[1], tmp_path / "x.zip", replace={"config.json": json.dumps(document).encode()}
    )
    with pytest.raises(ValueError, match=f"field '{field}' = .*expected a finite number > 0"):
        load_archive(path)


@pytest.mark.parametrize(
    "version", [None, "1", 0, 1.0, True], ids=["missing", "str", "zero", "float", "bool"]
)
def test_a_missing_or_malformed_format_version_says_damaged_not_upgrade(saved, tmp_path, version):
    """'format_version None ... upgrade ptychodus-torch-plugin': no upgrade reads it."""

    def change(manifest):
        if version is None:
            manifest.pop("format_version")
        else:
            manifest["format_version"] = version
        return manifest

    path = _with_manifest(saved[1], tmp_path / "x.zip", change)
    expected = "is missing" if version is None else f"= {version!r}"
    for read in (load_archive, inspect_archive):
        with pytest.raises(ValueError, match=f"format_version {expected}.*damaged") as info:
            read(path)
        assert "upgrade" not in str(info.value)


def test_a_newer_format_is_refused_by_the_loader_and_described_by_inspect(saved, tmp_path):
    newer = archive_module.FORMAT_VERSION + 1
    path = _with_manifest(saved[1], tmp_path / "x.zip", lambda m: {**m, "format_version": newer})
    with pytest.raises(ValueError, match=f"format_version {newer} is newer.*upgrade"):
        load_archive(path)
    described = inspect_archive(path)
    assert described["manifest"]["format_version"] == newer
    assert described["backend"] == "pytorch" and described["verified"] is False
    assert described["config"] is None and "upgrade ptychodus-torch-plugin" in described["note"]
    json.dumps(described)  # printable as JSON


# ----------------------------------------------------------------------------- atomic save
def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model = _model(gridsize=1, neighbor_count=4)
    original = archive_module._tensor_bytes
    calls = []

    def failing(state):
        calls.append(1)
        if len(calls) == 2:  # the first weights member is already in the zip
            raise KeyboardInterrupt("simulated interruption mid-write")
        return original(state)

    monkeypatch.setattr(archive_module, "_tensor_bytes", failing)
    with pytest.raises(KeyboardInterrupt):
        save_archive(model, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no wts.h5.zip, no temp file

    # An interrupted save over an existing archive keeps the old one intact.
    monkeypatch.setattr(archive_module, "_tensor_bytes", original)
    path = save_archive(model, tmp_path)
    before = path.read_bytes()
    calls.clear()
    monkeypatch.setattr(archive_module, "_tensor_bytes", failing)
    with pytest.raises(KeyboardInterrupt):
        save_archive(model, tmp_path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [ARCHIVE_NAME]
