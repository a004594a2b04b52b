"""Checkpoint files and states: safe loading (a real payload never runs), random states, the
CSV and its cells."""

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
    # the payload is real: a plain unpickler runs it
    pickle.loads(pickle.dumps(Payload(str(control))))
    assert control.read_text() == "ran"
    with pytest.raises(utils.CheckpointError, match="refused and nothing in it ran"):
        utils.load_state_dict(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [(None, "does not exist"), (b"", "truncated or not"),
                                              (b"hello, not a checkpoint",
                                              "not a PyTorch checkpoint")])
def test_bad_files_get_a_clear_message(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(utils.CheckpointError, match=message):
        utils.load_torch(str(path), "WEIGHTS")


def test_a_fifo_or_a_link_to_a_device_is_said_to_be_no_regular_file_never_missing(tmp_path):
    os.mkfifo(tmp_path / "fifo.pth")  # torch.load of it would wait for a writer for ever
    os.symlink(os.devnull, tmp_path / "device.pth")
    for name in ("fifo.pth", "device.pth"):
        with pytest.raises(utils.CheckpointError,
                           match=r"^the best model .* is not a regular file$"):
            utils.load_torch(str(tmp_path / name), "the best model")
    with pytest.raises(utils.CheckpointError, match=r"^RESUME .*gone.pth does not exist$"):
        utils.load_torch(str(tmp_path / "gone.pth"), "RESUME")


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


# ------------------------------------------------------------------ CSV cells


FORMULAS = ["=HYPERLINK(\"http://x\")", "+1+2", "-2+3", "@SUM(A1)", "\tcmd", "\rcmd"]


def test_text_cells_that_start_as_a_formula_get_a_leading_quote_and_the_rest_stay_as_they_are():
    assert [utils.safe_cell(text) for text in FORMULAS] == ["'" + text for text in FORMULAS]
    others = ("cat", "a=b", "", -2.5, 3, None)
    assert [utils.safe_cell(value) for value in others] == list(others)
    frame = pd.DataFrame({"path": ["-x.jpg", "y.jpg"], "p1": [-0.5, 0.25]})
    safe = utils.spreadsheet_safe(frame)
    assert safe["path"].tolist() == ["'-x.jpg", "y.jpg"] and safe["p1"].tolist() == [-0.5, 0.25]
    assert frame["path"].tolist() == ["-x.jpg", "y.jpg"]  # the table given is left as it was


def test_the_metrics_csv_escapes_its_text_cells(tmp_path):
    path = str(tmp_path / "m.csv")
    utils.write_metrics([{"epoch": 1, "train_loss": 1.0, "monitor": "=1+2", "event": "@x"}], path)
    row = pd.read_csv(path).iloc[0]
    assert row["monitor"] == "'=1+2" and row["event"] == "'@x" and row["epoch"] == 1
