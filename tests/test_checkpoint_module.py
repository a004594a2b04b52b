"""A run's files: what the checkpoint holds, a resume from it, files of another format refused, an
earlier run's files moved aside."""

import dataclasses
import datetime
import io
import json
import math
import os
import threading

import pytest
import torch

import checkpoint_module
import files_module
import model_module
import optim_module
import state_module
import train_module
import utils
from callback_module import LRA
from conftest import configs, make_tiny_data
from state_module import RunInfo, TrainState


def new_state(data, model_name="cnn", started=None):
    model = model_module.get_model(model_name, 4)
    optimizer = optim_module.make_optimizer(model, configs(LR=0.05).optim)
    info = RunInfo({"MODEL": model_name, "DATASET": "cifar10", "FREEZE": False}, data.classes,
                   list(data.mean), list(data.std), 16, started=started)
    return TrainState(model, optimizer, LRA(configs(ASK_EPOCH=None).lra, stream=io.StringIO()),
                      info=info)


def run_fit(tmp_path, epochs=2, started=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    data = make_tiny_data(size=16)
    state = new_state(data, started=started)
    history = train_module.fit(state, data, configs(EPOCHS=epochs, OUTPUT_DIR=str(tmp_path)).fit)
    return state, data, history


def test_the_checkpoint_holds_everything_a_resume_needs(tmp_path):
    state, _, _ = run_fit(tmp_path, epochs=2)
    checkpoint = torch.load(tmp_path / "last_checkpoint.pth", weights_only=True)
    fields = [field.name for field in dataclasses.fields(RunInfo)]
    assert set(checkpoint) == {*state_module.KEYS, *fields, "format"}
    assert checkpoint["epoch"] == 2 and len(checkpoint["history"]) == 2
    assert checkpoint["lra"]["best_epoch"] == state.lra.best_epoch and checkpoint["best"][
        "model"] is not None


def test_a_resume_loads_the_whole_state_and_rewrites_the_best_files_from_the_checkpoint(tmp_path):
    state, data, history = run_fit(tmp_path / "run", epochs=2)
    (tmp_path / "run" / "best_model.pth").unlink()
    path = str(tmp_path / "run" / "last_checkpoint.pth")
    resumed = new_state(data, started=state.info.started)
    checkpoint_module.resume(checkpoint_module.read_checkpoint(path), path, resumed,
                             output_dir=str(tmp_path / "run"))
    assert resumed.epoch == 2 and resumed.history == history
    assert resumed.lra.state_dict() == state.lra.state_dict()
    for key, value in resumed.best.model.items():
        assert torch.equal(value, state.best.model[key])
    for key, value in resumed.model.state_dict().items():  # the last epoch's weights, not the best
        assert torch.equal(value, torch.load(path, weights_only=True)["model"][key])
    saved = torch.load(tmp_path / "run" / "best_model.pth", weights_only=True)
    assert all(torch.equal(saved[key], value) for key, value in state.best.model.items())


def test_a_checkpoint_of_another_format_or_model_is_refused(tmp_path):
    state, data, _ = run_fit(tmp_path / "run", epochs=1)
    path = str(tmp_path / "run" / "last_checkpoint.pth")
    checkpoint = torch.load(path, weights_only=True)
    utils.save_torch({**checkpoint, "format": 1}, str(tmp_path / "old.pth"))
    with pytest.raises(utils.CheckpointError,
                       match="is not a last_checkpoint.pth of this pipeline"):
        checkpoint_module.read_checkpoint(str(tmp_path / "old.pth"))
    other = new_state(data, model_name="resnet18_cifar")
    with pytest.raises(utils.CheckpointError,
                       match="was saved with MODEL = 'cnn', but this run has 'resnet18_cifar'"):
        checkpoint_module.resume(checkpoint, path, other, output_dir=str(tmp_path / "run"))


def test_a_checkpoint_written_before_the_ema_existed_resumes_as_a_run_without_one(
        tmp_path, one_thread):
    state, data, history = run_fit(tmp_path / "run", epochs=1)
    path = str(tmp_path / "old.pth")
    checkpoint = torch.load(tmp_path / "run" / "last_checkpoint.pth", weights_only=True)
    del checkpoint["ema"], checkpoint["best"]["ema"]  # as FORMAT 2 files were first written
    utils.save_torch(checkpoint, path)
    resumed = new_state(data, started=state.info.started)
    checkpoint_module.resume(checkpoint_module.read_checkpoint(path), path, resumed, output_dir=str(
        tmp_path / "run"))
    assert resumed.ema is None and resumed.history == history
    saved = torch.load(tmp_path / "run" / "best_model.pth", weights_only=True)
    assert all(torch.equal(saved[key], value) for key, value in state.best.model.items())


# ----------------------------------------------------------------------------- earlier runs


def files_in(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def test_both_files_record_when_the_run_started(tmp_path):
    started = checkpoint_module.timestamp()
    run_fit(tmp_path, epochs=1, started=started)
    assert torch.load(tmp_path / "last_checkpoint.pth", weights_only=True)["started"] == started
    assert json.loads((tmp_path / "best_model.json").read_text())["started"] == started
    assert checkpoint_module.run_started(str(tmp_path)) == datetime.datetime.fromisoformat(started)


def test_an_earlier_run_moves_to_previous_under_its_start_time_byte_for_byte(tmp_path, capsys):
    out = tmp_path / "out"
    run_fit(out, epochs=2, started="2026-11-27T03:58:12+00:00")
    (out / "notes.txt").write_text("mine")
    before = {name: data for name, data in files_in(out).items() if name != "notes.txt"}
    assert set(before) == {"last_checkpoint.pth", "best_model.pth", "best_model.json",
                           "training_metrics.csv"}
    local = datetime.datetime(2026, 11, 27, 3, 58, 12, tzinfo=datetime.timezone.utc).astimezone()
    expected = out / "previous" / local.strftime("%Y-%m-%dT%H-%M-%S")

    assert checkpoint_module.move_earlier_run(str(out)) == str(expected)
    assert files_in(expected) == before
    assert files_in(out) == {"notes.txt": b"mine"}  # what the run did not write stays
    assert capsys.readouterr().out == f"The earlier run's files are kept in {expected}\n"

    # another run that started the same second
    run_fit(out, epochs=1, started="2026-11-27T03:58:12+00:00")
    assert checkpoint_module.move_earlier_run(str(out)) == f"{expected}_2"
    assert set(files_in(expected)) == set(files_in(out / "previous" / f"{expected.name}_2")) == set(
        before)


def test_files_that_did_not_record_a_start_are_named_by_the_oldest_file(tmp_path):
    for age, name in enumerate(["training_metrics.csv", "best_model.pth", "last_checkpoint.pth"]):
        (tmp_path / name).write_bytes(b"written before runs recorded their start")
        os.utime(tmp_path / name, (1_800_000_000 - 3600 * age,) * 2)
    oldest = datetime.datetime.fromtimestamp(1_800_000_000 - 7200)
    assert checkpoint_module.move_earlier_run(str(tmp_path)).endswith(
        oldest.strftime("previous/%Y-%m-%dT%H-%M-%S"))


def test_a_checkpoint_alone_gives_its_start_time(tmp_path):
    utils.save_torch({"started": "2026-01-02T03:04:05+00:00"},
                     str(tmp_path / "last_checkpoint.pth"))
    assert checkpoint_module.run_started(str(tmp_path)) == datetime.datetime(
        2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)


def test_a_folder_without_a_run_moves_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert checkpoint_module.move_earlier_run(str(tmp_path)) is None
    assert os.listdir(tmp_path) == ["notes.txt"]


def writer_state(model, epoch=1):
    optimizer = optim_module.make_optimizer(model, configs(LR=0.05).optim)
    best = state_module.Snapshot(with_optimizer=False)
    best.take(model, optimizer)
    return TrainState(model, optimizer, LRA(configs(ASK_EPOCH=None).lra, stream=io.StringIO()),
                      best, history=[{"epoch": epoch, "val_loss": 1.0}])


def test_the_background_writer_saves_the_state_as_it_was_when_asked(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4)
    state = writer_state(model)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    trained_on, save_torch = threading.Event(), utils.save_torch

    def after_the_next_step(obj, path):  # the write starts only once the live tensors have changed
        assert trained_on.wait(10)
        save_torch(obj, path)

    monkeypatch.setattr(utils, "save_torch", after_the_next_step)
    writer = checkpoint_module.EpochWriter(str(tmp_path))
    writer.save(state.state_dict(), new_best=True)
    with torch.no_grad():  # the next epoch changes the live tensors while the files are written
        for p in model.parameters():
            p.add_(1.0)
    state.history.append({"epoch": 2, "val_loss": 0.5})
    trained_on.set()
    writer.wait()
    checkpoint = torch.load(tmp_path / "last_checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 1 and len(checkpoint["history"]) == 1
    assert all(torch.equal(checkpoint["model"][k], v) for k, v in expected.items())
    # the modules' versions, for loading
    assert checkpoint["model"]._metadata == model.state_dict()._metadata
    assert all(torch.equal(v, expected[k])
               for k, v in torch.load(tmp_path / "best_model.pth").items())
    # header and epoch 1
    assert len(open(tmp_path / "training_metrics.csv").read().splitlines()) == 2


def test_a_failed_background_write_is_raised_by_fit(tmp_path, monkeypatch):
    def full_disk(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(utils, "save_torch", full_disk)
    writer = checkpoint_module.EpochWriter(str(tmp_path))
    # returns at once; the write fails behind it
    writer.save(writer_state(model_module.get_model("cnn", 4)).state_dict(), new_best=True)
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    writer.wait()  # raised once
    with pytest.raises(OSError, match="No space left"):
        run_fit(tmp_path / "run", epochs=2)
    assert not os.path.exists(tmp_path / "run" / "last_checkpoint.pth")


def test_the_writer_copies_the_whole_state_to_the_host_in_one_call(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = model_module.get_model("cnn", 4)
    state = writer_state(model)
    checkpoint = state.state_dict()
    calls, copy_to_host = [], checkpoint_module.copy_to_host

    def counted(tensors):
        calls.append(list(tensors))
        return copy_to_host(tensors)

    monkeypatch.setattr(checkpoint_module, "copy_to_host", counted)
    writer = checkpoint_module.EpochWriter(str(tmp_path))
    writer.save(checkpoint, new_best=True)
    writer.wait()
    expected = [leaf for leaf in torch.utils._pytree.tree_leaves(checkpoint)
                if isinstance(leaf, torch.Tensor)]
    assert len(calls) == 1  # one pass, so one wait for a device however many tensors
    # the model's, the best weights', the random states...
    assert len(expected) > len(model.state_dict())
    # every tensor of the state, each once
    assert sorted(map(id, calls[0])) == sorted(map(id, expected))
    saved = torch.load(tmp_path / "last_checkpoint.pth", weights_only=True)
    assert all(torch.equal(saved["model"][k], v) for k, v in model.state_dict().items())


def test_host_copies_are_new_tensors_with_the_values_and_strides():
    weight = torch.randn(8, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    tensors = [weight, torch.arange(5), torch.ones(2, requires_grad=True)]
    copies = checkpoint_module.copy_to_host(tensors)
    for original, copied in zip(tensors, copies):
        assert copied.data_ptr() != original.data_ptr() and torch.equal(copied, original.detach())
        assert copied.stride() == original.stride() and not copied.requires_grad
    assert checkpoint_module.copy_to_host([]) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="copies from a CUDA device need one")
def test_cuda_tensors_reach_pinned_host_memory_with_no_synchronising_copy():
    x = torch.randn(2048, 2048, device="cuda")
    for _ in range(20):  # queued work that the copy must wait for
        x = torch.tanh(x @ x / 64)
    weight = torch.randn(64, 3, 3, 3, device="cuda").contiguous(memory_format=torch.channels_last)
    tensors = [x, weight, torch.arange(10, device="cuda"), torch.randn(5)]
    # a copy that waits for the device (as .to("cpu") does) raises
    torch.cuda.set_sync_debug_mode("error")
    try:
        copies = checkpoint_module.copy_to_host(tensors)
        first = copies[0].clone()  # read at once: the one wait at the end has let every copy land
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(first, x.cpu())
    for original, copied in zip(tensors, copies):
        assert copied.device.type == "cpu" and torch.equal(copied, original.cpu())
        assert copied.stride() == original.stride()
    assert all(c.is_pinned() for c in copies[:3]) and copies[3].data_ptr() != tensors[3].data_ptr()


# --------------------------------------------------------------------------- links in OUTPUT_DIR


@pytest.mark.parametrize("name", [*checkpoint_module.RUN_FILES, files_module.LOCK_FILE])
def test_a_link_in_place_of_any_file_a_run_writes_or_moves_is_refused(tmp_path, name):
    victim, out = tmp_path / "victim.txt", tmp_path / "out"
    victim.write_text("someone else's file")
    out.mkdir()
    (out / name).symlink_to(victim)
    expected = f"^{out / name} is a symbolic link to {victim}, not a file of a run"
    with pytest.raises(ValueError, match=expected):
        checkpoint_module.check_output_dir(str(out))
    with pytest.raises(ValueError, match=expected):
        checkpoint_module.move_earlier_run(str(out))  # never moves a link, nor anything beside one
    assert victim.read_text() == "someone else's file" and (out / name).is_symlink()
    assert not (out / "previous").exists()


@pytest.mark.parametrize("folder", ["previous", "tensorboard", "mlruns"])
def test_a_run_folder_that_is_a_link_is_refused_and_nothing_leaves_the_output_dir(tmp_path, folder):
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir()
    out.mkdir()
    (out / "training_metrics.csv").write_text("epoch\n1\n")
    (out / folder).symlink_to(elsewhere)
    expected = f"^{out / folder} is a symbolic link to {elsewhere}, not a folder of a run"
    with pytest.raises(ValueError, match=expected):
        checkpoint_module.move_earlier_run(str(out))
    assert os.listdir(elsewhere) == []
    assert (out / "training_metrics.csv").read_text() == "epoch\n1\n"
    (out / folder).unlink()
    (out / folder).write_text("a file")
    with pytest.raises(ValueError, match=f"^{out / folder} is a file, not a folder of a run"):
        checkpoint_module.check_output_dir(str(out))


def test_leftover_temporary_files_are_removed_but_a_link_named_like_one_is_left(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's file")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".last_checkpoint.pth.abc.tmp").write_bytes(b"half a checkpoint")
    (out / ".best_model.pth.def.tmp").symlink_to(victim)
    checkpoint_module.remove_partial_writes(str(out))
    assert os.listdir(out) == [".best_model.pth.def.tmp"]
    assert victim.read_text() == "someone else's file"


@pytest.mark.parametrize("started", ["9999-12-31T23:59:59+00:00", "2026-11-27T03:58:12",
                                     "yesterday", 5, None])
def test_a_start_that_is_not_a_past_time_with_an_offset_names_the_folder_by_the_oldest_file(
        tmp_path, started):
    (tmp_path / "best_model.json").write_text(json.dumps({"started": started}))
    os.utime(tmp_path / "best_model.json", (1_800_000_000,) * 2)
    assert checkpoint_module.run_started(str(tmp_path)) == \
        datetime.datetime.fromtimestamp(1_800_000_000).astimezone()


# ----------------------------------------------------------------------- fields checked before use


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-epoch run's files: (its folder, best_model.json's dict, last_checkpoint.pth's)."""
    out = tmp_path_factory.mktemp("finished")
    run_fit(out, epochs=1, started="2026-11-27T03:58:12+00:00")
    return out, json.loads((out / "best_model.json").read_text()), torch.load(
        out / "last_checkpoint.pth", weights_only=True)


CHANGED = "; the file was changed, or not written by this pipeline: "
HOSTILE_INFO = [  # a field of best_model.json or of the checkpoint, a value, what the one line says
    ("classes", 5, "classes takes a list, each text, not 5"),
    ("classes", ["c0", 1, "c2", "c3"], "classes takes a list, each text, not ['c0', 1, 'c2', "),
    ("classes", ["c0"], "classes = ['c0'] is out of range: use two or more names, each once"),
    ("classes", ["c0", "c0", "c1", "c2"], "classes = ['c0', 'c0', 'c1', 'c2'] is out of range"),
    ("mean", [0.5, 0.5], "mean = [0.5, 0.5] is out of range: use three finite numbers"),
    ("mean", [0.5, math.nan, 0.5], "mean = [0.5, nan, 0.5] is out of range"),
    ("std", [0.2, 0.0, 0.2], "std = [0.2, 0.0, 0.2] is out of range: use three finite numbers, "
                             "one a colour channel, each > 0"),
    ("image_size", 60000, "image_size = 60000 is out of range: use a whole number of pixels from 8 "
                          "to 1024"),
    ("image_size", "16", "image_size takes a whole number, not '16'"),
    ("image_size", 16.0, "image_size takes a whole number, not 16.0"),
    ("resize_size", 10 ** 9, "resize_size = 1000000000 is out of range: use from image_size (16) "
                             "to twice it"),
    ("precision", "fp8", "precision = 'fp8' is not known; choose one of 'bf16', 'fp32'"),
    ("started", "9999-12-31T23:59:59+00:00", "started = '9999-12-31T23:59:59+00:00' is not when a "
                                             "run started"),
    ("started", "../../elsewhere", "started = '../../elsewhere' is not when a run started"),
    ("started", "2026-11-27T03:58:12", "started = '2026-11-27T03:58:12' is not when a run started"),
]


@pytest.mark.parametrize("field, value, message", HOSTILE_INFO + [
    ("model", "../../evil", "model = '../../evil' is not known"),
    ("model", ["cnn"], "model takes text, not"),
    ("data_dir", 5, "data_dir takes text or none, not 5"),
    ("dataset", "mnist", "dataset = 'mnist' is not known")])
def test_each_field_of_best_model_json_is_checked_before_use_with_one_line(
        finished_run, tmp_path, field, value, message):
    _, info, _ = finished_run
    (tmp_path / "best_model.json").write_text(json.dumps({**info, field: value}))
    with pytest.raises(utils.CheckpointError) as error:
        checkpoint_module.load_best_model_info(str(tmp_path))
    line = str(error.value)
    assert line.startswith(f"{tmp_path / 'best_model.json'}: {message}") and "\n" not in line
    assert line.endswith(f"{CHANGED}train again to rewrite it")


def test_best_model_json_too_big_too_deep_or_not_an_object_is_refused_before_its_fields(tmp_path):
    path = tmp_path / "best_model.json"
    with open(path, "wb") as f:
        f.truncate(checkpoint_module.MAX_INFO_BYTES + 1)  # sparse: checked by its size, never read
    with pytest.raises(utils.CheckpointError, match="takes 16 MB, more than a best_model.json"):
        checkpoint_module.load_best_model_info(str(tmp_path))
    for text, fragment in (("[" * 100_000 + "]" * 100_000, "is not readable JSON"),
                           ('["cnn"]', "is not a JSON object of a run"),
                           ("{", "is not readable JSON")):
        path.write_text(text)
        with pytest.raises(utils.CheckpointError, match=fragment):
            checkpoint_module.load_best_model_info(str(tmp_path))


@pytest.mark.parametrize("field, value, message", HOSTILE_INFO + [
    ("epoch", "1", "epoch takes a whole number, not '1'"),
    ("epoch", 7, "epoch = 7 and its history's epochs, [1], are not 1, 2, ... up to it"),
    ("history", [{"epoch": 1, "train_loss": [1.0]}], "history's values takes"),
    ("config", [("MODEL", "cnn")], "config takes a table of names and values, not"),
    ("config", {1: "cnn"}, "config's names takes a list, each text, not [1]")])
def test_each_plain_field_of_a_checkpoint_is_checked_when_it_is_read(
        finished_run, tmp_path, field, value, message):
    _, _, checkpoint = finished_run
    path = tmp_path / "bad.pth"
    utils.save_torch({**checkpoint, field: value}, str(path))
    with pytest.raises(utils.CheckpointError) as error:
        checkpoint_module.read_checkpoint(str(path))
    line = str(error.value)
    assert line.startswith(f"RESUME {path}: {message}") and "\n" not in line
    assert line.endswith(f"{CHANGED}resume another checkpoint, or start afresh")


@pytest.mark.parametrize("key, value", [("best_epoch", "1"), ("bad_epochs", 1.5),
                                        ("monitor", "os.system"), ("prompts_off", 0)])
def test_lras_state_of_the_wrong_kind_is_refused_on_resume_and_none_of_it_loads(
        finished_run, tmp_path, key, value):
    out, _, checkpoint = finished_run
    path = tmp_path / "bad.pth"
    utils.save_torch({**checkpoint, "lra": {**checkpoint["lra"], key: value}}, str(path))
    state = new_state(make_tiny_data(size=16), started=checkpoint["started"])
    with pytest.raises(utils.CheckpointError, match=f"does not fit this run's model .*lra's {key}"):
        checkpoint_module.resume(checkpoint_module.read_checkpoint(str(path)), str(path), state,
                                 output_dir=str(tmp_path / "out"))
    assert state.lra.best_epoch is None and state.history == []
