"""What every trainer's --resume relies on: checkpoints swapped in whole (and recovered after an interrupted
swap), a loss log cut back to the checkpoint, and --config values checked against the settings' types."""
import json
import os

import pytest

from text2ct_engine.train.clip import CLIPTrainConfig
from text2ct_engine.io_utils import atomic_dir, recover_dir
from text2ct_engine.train.common import LossLog, checkpoint_state, open_run, typed_settings


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    path = tmp_path / "checkpoint"
    with atomic_dir(str(path)) as tmp:
        (tmp_path / "x").write_text("")  # unrelated files stay
        open(os.path.join(tmp, "a"), "w").write("1")
    assert sorted(os.listdir(path)) == ["a"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(str(path)) as tmp:
            open(os.path.join(tmp, "b"), "w").write("2")
            raise KeyboardInterrupt
    assert sorted(os.listdir(path)) == ["a"] and sorted(os.listdir(tmp_path)) == ["checkpoint", "x"]
    with atomic_dir(str(path)) as tmp:
        open(os.path.join(tmp, "b"), "w").write("2")
    assert sorted(os.listdir(path)) == ["b"] and sorted(os.listdir(tmp_path)) == ["checkpoint", "x"]


def test_an_interrupted_swap_is_recovered(tmp_path):
    ckpt = tmp_path / "checkpoint"
    old = tmp_path / "checkpoint.old"  # stopped between the two renames: only the old checkpoint is whole
    old.mkdir()
    (old / "state.json").write_text(json.dumps({"step": 3}))
    (tmp_path / ".tmp-checkpoint-abc").mkdir()  # the new one, maybe half-written
    assert checkpoint_state(str(tmp_path)) == {"step": 3}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    old.mkdir()  # stopped before the old one was deleted: the new one is in place
    (old / "state.json").write_text(json.dumps({"step": 3}))
    (ckpt / "state.json").write_text(json.dumps({"step": 6}))
    recover_dir(str(ckpt))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"] and checkpoint_state(str(tmp_path)) == {"step": 6}
    os.replace(ckpt, old)
    assert open_run(str(tmp_path), resume=True)[2]  # a resume finds the recovered checkpoint


def test_loss_log_is_cut_back_to_the_resumed_step(tmp_path):
    path = tmp_path / "loss.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    log = LossLog(str(path), resume_step=3)
    log.log(step=4, loss=0.0)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert log.rows == [{"step": 4, "loss": 0.0}]  # this run's rows
    LossLog(str(path))  # a fresh run starts a fresh log
    assert path.read_text() == ""


def test_config_values_are_checked_against_the_settings_types():
    raw = {"steps": 5, "lr": 1, "size": [16, 16, 8], "spacing": None, "ema_decay": 0.9, "resize": "crop_pad",
           "gradient_checkpointing": False}
    assert typed_settings(raw, CLIPTrainConfig, "c.json") == {**raw, "lr": 1.0, "size": (16, 16, 8)}
    for bad, message in (({"steps": "abc"}, "c.json: steps must be a whole number, got 'abc'"),
                         ({"steps": 2.5}, "steps must be a whole number"), ({"steps": True}, "whole number"),
                         ({"lr": "fast"}, "lr must be a number"), ({"size": [16, 16]}, "size must be a list of 3"),
                         ({"size": [16, 16, "8"]}, "size must be a whole number"),
                         ({"gradient_checkpointing": 1}, "must be true or false"), ({"resize": 3}, "a string")):
        with pytest.raises(ValueError, match=message):
            typed_settings(bad, CLIPTrainConfig, "c.json")
