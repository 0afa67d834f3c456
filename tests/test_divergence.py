"""A diverged training run stops with one line (useful_code/divergence.py), and a reload check on a model whose own
outputs are NaN says so instead of blaming the checkpoint."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import ROOT, run
from useful_code.checkpoints import verify_reload
from useful_code.cli import UserError
from useful_code.divergence import StopOnNonFiniteLoss


def log(callback, step, fp16=False, **logs):
    args = SimpleNamespace(fp16=fp16, learning_rate=1e-5)
    callback.on_log(args, SimpleNamespace(global_step=step), None, logs=logs)


def test_a_finite_log_passes_and_the_first_non_finite_one_stops_the_run():
    guard = StopOnNonFiniteLoss()
    log(guard, 10, loss=0.69, grad_norm=1.5, learning_rate=1e-5)
    log(guard, 20, loss=0.52, grad_norm=0.9, rewards="not a number")
    log(guard, 25, eval_loss=0.5)  # an evaluation's log: no training loss, not a training step's record
    assert guard.last_finite_step == 20
    with pytest.raises(UserError, match=r"training diverged: the training loss is nan at step 30 \(last finite log: "
                                        r"step 20; --learning_rate 1e-05\)\. Nothing was published"):
        log(guard, 30, loss=math.nan, grad_norm=2.0)
    with pytest.raises(UserError, match="the gradient norm is inf at step 40"):
        log(StopOnNonFiniteLoss(), 40, loss=0.7, grad_norm=math.inf)
    with pytest.raises(UserError, match="the training loss is -inf and the gradient norm is nan"):
        log(StopOnNonFiniteLoss(), 50, loss=-math.inf, grad_norm=math.nan)


def test_the_last_step_is_always_logged():
    guard, control = StopOnNonFiniteLoss(), SimpleNamespace(should_log=False)
    for step in (1, 9):
        guard.on_step_end(None, SimpleNamespace(global_step=step, max_steps=10), control)
        assert control.should_log is False  # the Trainer's own logging_steps decide
    guard.on_step_end(None, SimpleNamespace(global_step=10, max_steps=10), control)
    assert control.should_log is True


def test_under_fp16_an_overflowing_gradient_norm_is_a_skipped_step_not_divergence():
    guard = StopOnNonFiniteLoss()
    log(guard, 10, fp16=True, loss=0.69, grad_norm=math.inf)  # loss scaling skips this step by design
    with pytest.raises(UserError, match="the training loss is nan at step 20"):
        log(guard, 20, fp16=True, loss=math.nan, grad_norm=math.inf)


def test_a_reload_check_of_a_model_that_gives_nan_blames_the_model_not_the_checkpoint():
    with pytest.raises(UserError, match="the trained model gives NaN or infinite rewards on 2 of 3 inputs"):
        verify_reload(np.array([1.0, np.nan, np.inf]), np.array([1.0, np.nan, np.inf]), torch.float32, "c", "rewards")
    pairs = np.array([[1.0, np.nan], [np.inf, np.nan], [0.5, 0.2]])  # counted per input, not per value: 2 of 3
    with pytest.raises(UserError, match="the trained model gives NaN or infinite logits on 2 of 3 inputs"):
        verify_reload(pairs, pairs, torch.float32, "c", "logits")


@pytest.mark.e2e
@pytest.mark.parametrize("script", ["bradley-terry-rm/train.py", "pair-pm/train.py"])
def test_a_diverging_run_stops_with_one_line_and_publishes_nothing(script, tmp_path):
    """A learning rate of 1e30 turns the tiny model's weights to NaN within a few steps. transformers alone would log
    a loss of 0 for those steps (its logging_nan_inf_filter), train to the end and fail in the reload check."""
    out = tmp_path / "run"
    proc = run(["python", str(ROOT / script), "--output_dir", str(out), "--learning_rate", "1e30", "--max_steps", "40",
                "--logging_steps", "1", "--report_to", "none"], env_extra={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.replace("\r", "\n").splitlines() if "error: " in line]
    assert len(errors) == 1 and "training diverged: the " in errors[0] and "is nan at step" in errors[0]
    assert not (out / "last_checkpoint").exists() and not (out / "metrics.json").exists()


@pytest.mark.e2e
def test_on_two_ranks_every_rank_says_why_the_run_stopped(tmp_path):
    """Every rank raised at the same logged step and exited alone: the first to exit had torchrun kill the other
    before it printed. Now each says the line, then all leave together."""
    from helpers import two_ranks

    proc = run([*two_ranks("torchrun"), str(ROOT / "bradley-terry-rm" / "train.py"), "--output_path",
                str(tmp_path / "run"), "--learning_rate", "1e30", "--max_steps", "6", "--logging_steps", "1"],
               env_extra={"OMP_NUM_THREADS": "1"})
    errors = [line[line.index("error: "):] for line in proc.stderr.replace("\r", "\n").splitlines()
              if "error: " in line]
    assert proc.returncode != 0 and len(errors) == 2 and errors[0] == errors[1], proc.stderr[-3000:]
    assert errors[0].startswith("error: training diverged: the ") and "failed (exitcode: 2)" in proc.stderr
    assert not any(marker in proc.stderr for marker in ("gloo", "terminate called", "UserError"))


@pytest.mark.parametrize("script, config", [("bradley-terry-rm/train.py", "RewardTrainingArguments"),
                                            ("pair-pm/train.py", "PreferenceModelConfig"),
                                            ("math-rm/train.py", "MathRewardConfig"),
                                            ("math-rm/scalar_orm_train.py", "ScalarORMTrainingArguments")])
def test_every_trainer_logs_non_finite_losses_as_they_are_and_stops_on_them(script, config):
    import dataclasses
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"trainer_{config}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    defaults = {f.name: f.default for f in dataclasses.fields(getattr(module, config))}
    assert defaults["logging_nan_inf_filter"] is False  # transformers' default (True) would log a NaN loss as 0
    assert "StopOnNonFiniteLoss()" in (ROOT / script).read_text()  # the callback the trainer is built with


def test_weights_made_non_finite_between_two_logs_stop_the_run_before_a_save():
    """An update between two logs can make the weights NaN: a checkpoint saved then would be what
    --resume_from_checkpoint latest picks (the resumed run diverging at once, blaming the learning rate), and saving
    it would let --save_total_limit remove an older, good one. Checked when the flow callback asks for a save."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    guard = StopOnNonFiniteLoss()
    log(guard, 5, loss=0.69, grad_norm=1.0)
    args = SimpleNamespace(learning_rate=1e-5)
    state = SimpleNamespace(global_step=6, max_steps=100)
    guard.on_step_end(args, state, SimpleNamespace(should_save=True, should_log=False), model=model)  # finite
    with torch.no_grad():
        model[1].bias[0] = math.inf
    guard.on_step_end(args, state, SimpleNamespace(should_save=False, should_log=False), model=model)  # no save
    with pytest.raises(UserError, match=r"training diverged: the weights hold NaN or infinite values at step 6 "
                                        r"\(last finite log: step 5; --learning_rate 1e-05\); they were not saved"):
        guard.on_step_end(args, state, SimpleNamespace(should_save=True, should_log=False), model=model)
