"""Output directories of training runs (checkpoints.claim_output_dir, publish_run): checked before any work,
one run at a time, finished runs kept, and the final checkpoint moved into place only once verified."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from useful_code.checkpoints import LOCK, STAGING, claim_output_dir, publish_run, resolve_resume, staging_dir
from useful_code.output_files import atomic_write_lines, atomic_write_text, save_dataset
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


def test_a_killed_overwriting_run_beside_a_finished_one_is_told_how_to_resume(tmp_path):
    """--overwrite_output_dir keeps the finished run whole until the new one ends: killed before that, its
    checkpoints sit beside the old metrics.json, and the advice must not be to throw them away."""
    finished_run(tmp_path, "old")
    os.utime(tmp_path / "metrics.json", (2, 2))
    (tmp_path / "checkpoint-5").mkdir()  # the finished run's own (older than its metrics.json)
    os.utime(tmp_path / "checkpoint-5", (1, 1))
    with pytest.raises(UserError, match=r"holds a finished run \(metrics.json\); pass --overwrite_output_dir"):
        claim_output_dir(str(tmp_path), False)
    (tmp_path / "checkpoint-50").mkdir()  # a later run's, killed
    with pytest.raises(UserError, match=r"holds a finished run \(metrics.json\) and 1 checkpoints of a later, "
                                        r"unfinished run \(the last checkpoint-50\); pass --resume_from_checkpoint "
                                        "latest --overwrite_output_dir to continue that run"):
        claim_output_dir(str(tmp_path), False)
    assert claim_output_dir(str(tmp_path), True, resuming=True) == tmp_path
    assert (tmp_path / "checkpoint-50").is_dir() and (tmp_path / "metrics.json").read_text() == "old"


def test_the_lock_is_taken_in_one_step(tmp_path):
    """Two runs started together: the first holds an flock on the lock file before it has written its PID (or
    with any PID in it); the second is refused rather than both seeing the lock free."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(tmp_path / LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(30)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=r"is in use by another run \(PID \?\)"):
            claim_output_dir(str(tmp_path), False)
        (tmp_path / LOCK).write_text("999999999")  # a PID that is gone, but the lock is still held
        with pytest.raises(UserError, match=r"is in use by another run \(PID 999999999\)"):
            claim_output_dir(str(tmp_path), False)
    finally:
        holder.kill()
        holder.wait()
    assert claim_output_dir(str(tmp_path), False) == tmp_path  # released by the holder's death
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


def test_a_new_run_does_not_start_beside_an_unfinished_runs_checkpoints(tmp_path, capsys):
    """A later --resume_from_checkpoint latest would take the killed run's checkpoint-30 for the new run's own."""
    for step in (5, 30):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-x").mkdir()  # not a numbered checkpoint: left alone
    with pytest.raises(UserError, match=rf"{tmp_path} holds 2 checkpoints of an unfinished run \(the last "
                                        r"checkpoint-30\); pass --resume_from_checkpoint latest to continue it, or "
                                        r"--overwrite_output_dir to start over"):
        claim_output_dir(str(tmp_path), False)
    assert claim_output_dir(str(tmp_path), False, resuming=True) == tmp_path  # resuming is what they are for
    assert (tmp_path / "checkpoint-30").is_dir()
    claim_output_dir(str(tmp_path), True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["checkpoint-x"]
    assert f"Removed the 2 checkpoints of an earlier run in {tmp_path} (--overwrite_output_dir)" in \
        capsys.readouterr().out
    assert claim_output_dir(str(tmp_path), False) == tmp_path


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


def test_publish_removes_the_old_runs_outputs_this_run_did_not_make(tmp_path):
    """A previous LoRA run's adapter/ and plot are not left beside a new full fine-tune's checkpoint."""
    finished_run(tmp_path, "old")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_text("old")
    (tmp_path / "curves.png").write_text("old")
    staged = tmp_path / STAGING
    (staged / "last_checkpoint").mkdir(parents=True)
    (staged / "last_checkpoint" / "model.safetensors").write_text("new")
    (staged / "metrics.json").write_text("new")
    publish_run(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "metrics.json"]
    assert (tmp_path / "last_checkpoint" / "model.safetensors").read_text() == "new"


def test_resume_targets_are_checked(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    assert resolve_resume(None, str(tmp_path)) is None
    with pytest.raises(UserError, match="--resume_from_checkpoint: /nope is not a periodic checkpoint directory"):
        resolve_resume("/nope", str(tmp_path))
    with pytest.raises(UserError, match="latest: .* has no complete checkpoint-N directory to resume"):
        resolve_resume("latest", str(tmp_path))
    for step in (5, 40, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
        save_file({"w": torch.ones(2)}, str(tmp_path / f"checkpoint-{step}" / "model.safetensors"))
    assert resolve_resume("latest", str(tmp_path)) == str(tmp_path / "checkpoint-40")
    # Saves cut short by a kill (the Trainer writes into checkpoint-N directly, trainer_state.json last): passed over
    (tmp_path / "checkpoint-60").mkdir()
    (tmp_path / "checkpoint-60" / "model.safetensors").write_text("half")
    (tmp_path / "checkpoint-50").mkdir()
    (tmp_path / "checkpoint-50" / "trainer_state.json").write_text('{"global_st')
    capsys.readouterr()
    assert resolve_resume("latest", str(tmp_path)) == str(tmp_path / "checkpoint-40")
    assert capsys.readouterr().out.splitlines() == [
        f"Passing over {tmp_path / 'checkpoint-60'}: its save was cut short (trainer_state.json missing or incomplete)",
        f"Passing over {tmp_path / 'checkpoint-50'}: its save was cut short (trainer_state.json missing or incomplete)",
        f"Resuming from {tmp_path / 'checkpoint-40'}"]
    # a file a callback writes after the Trainer's own (BT: its token counts) must be there too
    (tmp_path / "checkpoint-10" / "tokens.json").write_text("{}")
    assert resolve_resume("latest", str(tmp_path), written_last="tokens.json") == str(tmp_path / "checkpoint-10")
    assert resolve_resume(str(tmp_path / "checkpoint-5"), str(tmp_path)) == str(tmp_path / "checkpoint-5")
    # named by the user: the same check, one line instead of the Trainer's JSONDecodeError after loading everything
    with pytest.raises(UserError, match=r"checkpoint-50: its save was cut short \(trainer_state.json missing or "
                                        r"incomplete\); resume from an earlier checkpoint-N, or pass latest"):
        resolve_resume(str(tmp_path / "checkpoint-50"), str(tmp_path))
    with pytest.raises(UserError, match=r"checkpoint-5: its save was cut short \(trainer_state.json or tokens.json"):
        resolve_resume(str(tmp_path / "checkpoint-5"), str(tmp_path), written_last="tokens.json")
    with pytest.raises(UserError, match="checkpoint-N with loop_state.pt"):
        resolve_resume(str(tmp_path / "checkpoint-5"), str(tmp_path), marker="loop_state.pt")
    (tmp_path / "loop" / "checkpoint-3").mkdir(parents=True)  # a loop's checkpoint: its tensors are in loop_state.pt
    torch.save({"step": 3}, tmp_path / "loop" / "checkpoint-3" / "loop_state.pt")
    assert resolve_resume("latest", str(tmp_path / "loop"), marker="loop_state.pt") == str(
        tmp_path / "loop" / "checkpoint-3")
    # weights lost (a copy that left them out): one line for the path, passed over by 'latest'; the Trainer's
    # pickled arguments beside them are no weights
    (tmp_path / "checkpoint-40" / "model.safetensors").unlink()
    (tmp_path / "checkpoint-40" / "training_args.bin").write_bytes(b"pickled")
    with pytest.raises(UserError, match=r"checkpoint-40: it holds no weights \(model.safetensors is missing\)"):
        resolve_resume(str(tmp_path / "checkpoint-40"), str(tmp_path))
    capsys.readouterr()
    assert resolve_resume("latest", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert f"Passing over {tmp_path / 'checkpoint-40'}: it holds no weights" in capsys.readouterr().out


def test_a_checkpoint_of_another_kind_or_with_a_cut_optimizer_state_is_refused(tmp_path, capsys):
    """Resuming a BT run from a PM's checkpoint-N (or the reverse, or a PRM from a PM: the same architecture) traced
    back inside the optimizer or silently trained on; a cut optimizer.pt traced back after loading the model."""
    import torch
    from safetensors.torch import save_file

    def checkpoint(step: int, config: dict) -> Path:
        directory = tmp_path / f"checkpoint-{step}"
        directory.mkdir()
        (directory / "trainer_state.json").write_text("{}")
        (directory / "config.json").write_text(json.dumps(config))
        save_file({"w": torch.ones(2)}, str(directory / "model.safetensors"))
        torch.save({"state": {}}, directory / "optimizer.pt")
        return directory

    bt = checkpoint(1, {"architectures": ["LlamaForSequenceClassification"]})  # saved before kinds were recorded
    pm = checkpoint(2, {"architectures": ["LlamaForCausalLM"], "rlhf_reward_kind": "pm"})
    prm = checkpoint(3, {"architectures": ["LlamaForCausalLM"], "rlhf_reward_kind": "prm"})
    assert resolve_resume(str(bt), str(tmp_path), kind="bt") == str(bt)
    assert resolve_resume(str(pm), str(tmp_path), kind="pm") == str(pm)
    with pytest.raises(UserError, match=r"checkpoint-1: it is a checkpoint of a LlamaForSequenceClassification, not "
                                        r"of a pairwise preference model \(pair-pm/train.py\) \(a \.\.\.ForCausalLM\)"):
        resolve_resume(str(bt), str(tmp_path), kind="pm")
    with pytest.raises(UserError, match=r"checkpoint-2: it is a checkpoint of a pairwise preference model "
                                        r"\(pair-pm/train.py\), not of a math process reward model"):
        resolve_resume(str(pm), str(tmp_path), kind="prm")
    with pytest.raises(UserError, match="checkpoint-3: it is a checkpoint of a math process reward model"):
        resolve_resume(str(prm), str(tmp_path), kind="bt")
    capsys.readouterr()
    assert resolve_resume("latest", str(tmp_path), kind="pm") == str(pm)  # 3 is passed over, said
    assert capsys.readouterr().out.startswith(f"Passing over {prm}: it is a checkpoint of a math process reward")
    (pm / "global_step2").mkdir()  # DeepSpeed's states, which a config may save unzipped (legacy torch format)
    torch.save({"w": torch.ones(2)}, pm / "global_step2" / "mp_rank_00_model_states.pt",
               _use_new_zipfile_serialization=False)
    assert resolve_resume(str(pm), str(tmp_path), kind="pm") == str(pm)
    optimizer = pm / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-30])
    with pytest.raises(UserError, match=r"checkpoint-2: optimizer.pt is cut short or damaged \(not a complete torch "
                                        r"archive\)"):
        resolve_resume(str(pm), str(tmp_path), kind="pm")


def test_scorers_refuse_a_checkpoint_recorded_as_another_kind(tmp_path):
    """A PM checkpoint and a math PRM are both plain causal LMs: the kind the trainer recorded tells them apart."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from useful_code.defaults import DEFAULT_MODEL
    from useful_code.math_scoring import StepScorer
    from useful_code.modeling import record_kind
    from useful_code.pm_scoring import PairPreferenceScorer

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL)
    for kind in ("pm", "prm"):
        record_kind(model, kind)
        model.save_pretrained(tmp_path / kind)
        AutoTokenizer.from_pretrained(DEFAULT_MODEL).save_pretrained(tmp_path / kind)
    PairPreferenceScorer.from_pretrained(str(tmp_path / "pm"), bf16=False)
    StepScorer.from_pretrained(str(tmp_path / "prm"), bf16=False)
    with pytest.raises(UserError, match=r"--reward_name_or_path: '.*prm' is a math process reward model \(math-rm/"
                                        r"train.py --reward_type prm\), not a pairwise preference model; score it "
                                        r"with math-rm/prm_evaluate.py"):
        PairPreferenceScorer.from_pretrained(str(tmp_path / "prm"), bf16=False)
    with pytest.raises(UserError, match=r"'.*pm' is a pairwise preference model \(pair-pm/train.py\), not a math "
                                        r"process reward model or math outcome reward model; score it with "
                                        r"useful_code/eval_reward_bench_pm.py or pair-pm/rank_responses.py$"):
        StepScorer.from_pretrained(str(tmp_path / "pm"), bf16=False)
    PairPreferenceScorer.from_pretrained(DEFAULT_MODEL, bf16=False)  # no record (a hub or base model): its architecture


def test_lines_written_as_they_come_replace_the_file_only_whole(tmp_path):
    target = tmp_path / "out.jsonl"
    atomic_write_lines(target, (f"{i}\n" for i in range(3)))
    assert target.read_text() == "0\n1\n2\n"

    def failing():
        yield "new\n"
        raise RuntimeError("the source broke off")

    with pytest.raises(RuntimeError, match="broke off"):
        atomic_write_lines(target, failing())
    assert target.read_text() == "0\n1\n2\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_a_write_removes_a_killed_writes_leftover_but_not_a_live_ones(tmp_path):
    """Staged files of the same path: a gone PID's (a killed write) is removed by the next write; a live process's
    (its write still under way) is left alone."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / f".out.json.tmp-{gone.pid}").write_text("killed")
        (tmp_path / f".out.json.tmp-{live.pid}").write_text("writing")
        atomic_write_text(tmp_path / "out.json", "{}")
        assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.json.tmp-{live.pid}", "out.json"]
        assert (tmp_path / "out.json").read_text() == "{}"
    finally:
        live.kill()
        live.wait()


def test_published_weights_are_readable_as_the_umask_allows(tmp_path):
    """safetensors 0.8 writes 0600: another user, or a server running as one, could not read a trained model."""
    import torch
    from safetensors.torch import save_file

    from useful_code.output_files import atomic_save_file

    old_mask = os.umask(0o022)
    try:
        staged = tmp_path / STAGING / "last_checkpoint"
        staged.mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, str(staged / "model.safetensors"))
        (staged.parent / "metrics.json").write_text("{}")
        publish_run(str(tmp_path))
        atomic_save_file({"w": torch.zeros(2)}, tmp_path / "shard.safetensors")
        modes = [(path / name).stat().st_mode & 0o777 for path, name in (
            (tmp_path / "last_checkpoint", "model.safetensors"), (tmp_path, "shard.safetensors"),
            (tmp_path, "metrics.json"))]
    finally:
        os.umask(old_mask)
    assert modes == [0o644, 0o644, 0o644]


def test_resume_refuses_or_passes_over_damaged_weights(tmp_path, capsys):
    """A checkpoint-N whose weights were cut short or lost a shard (a copy cut short) would stop the resumed run with
    transformers' traceback: an explicit path is one line naming the file, 'latest' passes over it, said."""
    import torch
    from safetensors.torch import save_file

    def checkpoint(step: int) -> Path:
        directory = tmp_path / f"checkpoint-{step}"
        directory.mkdir()
        (directory / "trainer_state.json").write_text("{}")
        save_file({"a": torch.ones(64)}, str(directory / "model-00001-of-00002.safetensors"))
        save_file({"b": torch.ones(64)}, str(directory / "model-00002-of-00002.safetensors"))
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
        return directory

    good, lost, cut = checkpoint(10), checkpoint(20), checkpoint(30)
    (lost / "model-00002-of-00002.safetensors").unlink()
    shard = cut / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert resolve_resume(str(good), str(tmp_path)) == str(good)
    with pytest.raises(UserError, match=r"checkpoint-20: model-00002-of-00002.safetensors is missing \(listed in "):
        resolve_resume(str(lost), str(tmp_path))
    with pytest.raises(UserError, match=r"checkpoint-30: model-00001-of-00002.safetensors is cut short or damaged"):
        resolve_resume(str(cut), str(tmp_path))
    capsys.readouterr()
    assert resolve_resume("latest", str(tmp_path)) == str(good)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"Passing over {cut}: model-00001") and printed[2] == f"Resuming from {good}"


def test_a_dataset_output_is_written_atomically_and_a_failed_write_is_one_line(tmp_path, monkeypatch):
    """process_pair_data.py and RRM wrote onto the output itself: a full disk left a cut last line under the real
    name, and a traceback."""
    from datasets import Dataset, load_from_disk

    data = Dataset.from_list([{"a": 1}, {"a": 2}])
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")

    def cut_short(self, path, **kwargs):
        Path(path).write_text('{"a": 1}\n{"a"')
        raise OSError(27, "File too large")

    with monkeypatch.context() as patched:
        patched.setattr(Dataset, "to_json", cut_short)
        with pytest.raises(UserError, match=r"^--output_dataset: cannot write .*out.jsonl: File too large$"):
            save_dataset(data, str(target), "--output_dataset")
    assert target.read_text() == "old\n" and sorted(tmp_path.iterdir()) == [target]  # nothing staged left
    save_dataset(data, str(target), "--output_dataset")
    assert [json.loads(line) for line in target.read_text().splitlines()] == [{"a": 1}, {"a": 2}]
    for _ in range(2):  # a directory output, then replaced whole
        save_dataset(data.select([1]), str(tmp_path / "dir"), "--output_path")
    assert load_from_disk(str(tmp_path / "dir"))["train"].to_list() == [{"a": 2}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "out.jsonl"]


@pytest.mark.e2e
def test_a_refused_output_directory_stops_every_rank_with_its_line(tmp_path):
    """The output directory is claimed on the main rank: its refusal left the other rank waiting at the data barrier,
    to die there with a gloo traceback (a closed connection)."""
    from helpers import ROOT, run, two_ranks

    (tmp_path / "metrics.json").write_text("{}")  # a finished run
    proc = run([*two_ranks("torchrun"), str(ROOT / "bradley-terry-rm" / "train.py"), "--output_path", str(tmp_path),
                "--max_steps", "2"], env_extra={"OMP_NUM_THREADS": "1"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and errors == [f"error: --output_path: {tmp_path} holds a finished run (metrics.json); "
                                               "pass --overwrite_output_dir to replace it, or choose another "
                                               "--output_path"] * 2, proc.stderr[-3000:]
    assert "failed (exitcode: 2)" in proc.stderr  # torchrun's own report of the ranks' exit
    assert not any(marker in proc.stderr for marker in ("gloo", "Connection closed", "RuntimeError"))
