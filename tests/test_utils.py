"""Files and states: atomic writes, safe loading (a real payload never runs), random states, the CSV."""

import os
import pickle
import random

import numpy as np
import pandas as pd
import pytest
import torch

import utils


class Payload:
    """Pickles into code that writes a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_a_pickled_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "extra": Payload(str(marker))}, path)
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(str(control))))  # the payload is real: a plain unpickler runs it
    assert control.read_text() == "ran"
    with pytest.raises(utils.CheckpointError, match="refused and nothing in it ran"):
        utils.load_state_dict(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [(None, "does not exist"), (b"", "truncated or not"),
                                              (b"hello, not a checkpoint", "not a PyTorch checkpoint")])
def test_bad_files_get_a_clear_message(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(utils.CheckpointError, match=message):
        utils.load_torch(str(path), "WEIGHTS")


def test_a_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"a": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(utils.CheckpointError, match="truncated"):
        utils.load_torch(str(path))


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(utils.CheckpointError, match="not a model state dict"):
        utils.load_state_dict(str(path))


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"good")

    def failing(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        utils.atomic_write(str(path), failing)
    assert path.read_bytes() == b"good" and os.listdir(tmp_path) == ["file.bin"]


def test_random_states_round_trip_through_a_safe_checkpoint(tmp_path):
    utils.seed_everything(3)
    state = utils.rng_state()
    utils.save_torch(state, str(tmp_path / "rng.pth"))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    utils.seed_everything(99)
    utils.set_rng_state(utils.load_torch(str(tmp_path / "rng.pth")))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_write_metrics_gives_the_columns_in_order(tmp_path):
    path = str(tmp_path / "m.csv")
    utils.write_metrics([{"epoch": 1, "train_loss": 1.0, "seconds": 2.0}], path)
    frame = pd.read_csv(path)
    assert list(frame.columns) == utils.CSV_COLUMNS and frame["epoch"].tolist() == [1]


def test_an_unwritable_output_dir_is_reported(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="OUTPUT_DIR .* is not writable"):
        utils.check_writable(str(blocker / "sub"))
