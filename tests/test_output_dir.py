"""Output directories of training runs (checkpoints.claim_output_dir, publish_run): checked before any work,
one run at a time, finished runs kept, and the final checkpoint moved into place only once verified."""

import os
import subprocess
import sys

import pytest

from useful_code.checkpoints import LOCK, STAGING, claim_output_dir, publish_run, resolve_resume, staging_dir
from useful_code.cli import UserError


def finished_run(out, tag):
    (out / "last_checkpoint").mkdir(parents=True)
    (out / "last_checkpoint" / "model.safetensors").write_text(tag)
    (out / "metrics.json").write_text(tag)


def test_a_file_or_an_input_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        claim_output_dir(str(tmp_path / "f"), False)
    with pytest.raises(UserError, match="is also an input of this run"):
        claim_output_dir(str(tmp_path / "data"), False, inputs=(str(tmp_path / "data"), None))


def test_a_finished_run_is_kept_unless_overwrite(tmp_path):
    finished_run(tmp_path, "old")
    with pytest.raises(UserError, match="holds a finished run .* pass --overwrite_output_dir"):
        claim_output_dir(str(tmp_path), False)
    assert (tmp_path / "metrics.json").read_text() == "old"
    assert claim_output_dir(str(tmp_path), True) == tmp_path
    assert (tmp_path / LOCK).read_text() == str(os.getpid())


def test_a_live_lock_stops_a_second_run_and_a_stale_one_is_taken_over(tmp_path, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / LOCK).write_text(str(sleeper.pid))
        with pytest.raises(UserError, match=f"in use by another run \\(PID {sleeper.pid}\\)"):
            claim_output_dir(str(tmp_path), False)
    finally:
        sleeper.kill()
        sleeper.wait()
    claim_output_dir(str(tmp_path), False)  # the PID is gone now
    assert f"Taking over the stale lock of {tmp_path} (PID {sleeper.pid} is gone)" in capsys.readouterr().out
    assert (tmp_path / LOCK).read_text() == str(os.getpid())


def test_a_killed_save_leaves_the_previous_run_whole_and_is_cleaned_up(tmp_path):
    finished_run(tmp_path, "old")
    staged = tmp_path / STAGING / "last_checkpoint"  # what a run killed mid-save leaves
    staged.mkdir(parents=True)
    (staged / "model.safetensors").write_text("half")
    assert (tmp_path / "last_checkpoint" / "model.safetensors").read_text() == "old"
    assert (tmp_path / "metrics.json").read_text() == "old"
    claim_output_dir(str(tmp_path), True)
    assert not (tmp_path / STAGING).exists()


def test_publish_moves_the_verified_run_into_place(tmp_path):
    finished_run(tmp_path, "old")
    staged = tmp_path / STAGING
    (staged / "last_checkpoint").mkdir(parents=True)
    (staged / "last_checkpoint" / "model.safetensors").write_text("new")
    (staged / "metrics.json").write_text("new")
    assert staging_dir(str(tmp_path)) == str(staged)
    assert publish_run(str(tmp_path)) == str(tmp_path / "last_checkpoint")
    assert (tmp_path / "last_checkpoint" / "model.safetensors").read_text() == "new"
    assert (tmp_path / "metrics.json").read_text() == "new"
    assert not staged.exists() and sorted(p.name for p in (tmp_path / "last_checkpoint").iterdir()) == [
        "model.safetensors"]


def test_resume_targets_are_checked(tmp_path, capsys):
    assert resolve_resume(None, str(tmp_path)) is None
    with pytest.raises(UserError, match="--resume_from_checkpoint: /nope is not a periodic checkpoint directory"):
        resolve_resume("/nope", str(tmp_path))
    with pytest.raises(UserError, match="latest: .* has no checkpoint-N directory to resume"):
        resolve_resume("latest", str(tmp_path))
    for step in (5, 40, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert resolve_resume("latest", str(tmp_path)) == str(tmp_path / "checkpoint-40")
    assert resolve_resume(str(tmp_path / "checkpoint-5"), str(tmp_path)) == str(tmp_path / "checkpoint-5")
    with pytest.raises(UserError, match="checkpoint-N with loop_state.pt"):
        resolve_resume(str(tmp_path / "checkpoint-5"), str(tmp_path), marker="loop_state.pt")
