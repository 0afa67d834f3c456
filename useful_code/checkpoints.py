"""Training runs' checkpoints: the output directory a run claims (a lock, earlier runs' checkpoints), periodic
checkpoints and resuming from them (complete, undamaged, of the right kind), the final checkpoint staged, verified by
reloading it and published, and the callbacks that keep checkpoints to safetensors and the project's own files."""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from useful_code.cli import UserError
from useful_code.data_parallel import on_main
from useful_code.output_files import (
    atomic_write_text,
    check_output_dir,
    match_umask,
    own_lock,
    pid_alive,
    publish_dir,
    take_lock,
)


@dataclass
class OutputDirArguments:
    """The output directory policy every trainer shares (see claim_output_dir)."""

    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace a finished run (last_checkpoint/ and metrics.json) in the output directory."})


NEVER = 999999  # upstream's "no periodic save/eval" value


@dataclass
class PeriodicArguments:
    """Periodic saves and evaluations, off unless asked for, by upstream's names (--save_every_steps N,
    --eval_every_steps N) or transformers' own (--save_strategy, --save_steps, --eval_strategy, --eval_steps):
    with a "steps" strategy transformers also saves a full training state (optimizer included) at the last step.
    A mixin for TrainingArguments subclasses, listed before TrainingArguments; __post_init__ calls resolve_periodic."""

    save_every_steps: Optional[int] = field(default=None, metadata={
        "min": 1, "help": f"Save a checkpoint every x steps (upstream's flag: --save_strategy steps --save_steps x; "
                          f"{NEVER}, upstream's default, saves none)."})
    eval_every_steps: Optional[int] = field(default=None, metadata={
        "min": 1, "help": f"Evaluate every x steps (upstream's flag: --eval_strategy steps --eval_steps x; {NEVER}, "
                          "upstream's default, evaluates only at the end)."})
    # transformers' own flags, unset by default so that they can be told apart from upstream's names above.
    save_strategy: Optional[str] = field(default=None, metadata={
        "help": "Periodic checkpoints: no (the default here: only the final checkpoint), steps or epoch."})
    save_steps: Optional[float] = field(default=None, metadata={
        "help": "Save every x steps (a fraction of the steps when < 1); alone it implies --save_strategy steps, "
                "whose default x is 500."})
    eval_strategy: Optional[str] = field(default=None, metadata={
        "help": "Periodic evaluation: no (the default: only at the end), steps or epoch."})

    def resolve_periodic(self) -> None:
        """Set transformers' save/eval strategy and steps from whichever names were given."""
        self.save_strategy, self.save_steps = periodic_strategy(
            "save", self.save_every_steps, self.save_strategy, self.save_steps, default_steps=500)
        self.eval_strategy, self.eval_steps = periodic_strategy(
            "eval", self.eval_every_steps, self.eval_strategy, self.eval_steps, default_steps=None)


def periodic_strategy(kind: str, every: Optional[int], strategy: Optional[str], steps: Optional[float],
                      default_steps: Optional[float]) -> tuple[str, Optional[float]]:
    """transformers' (--{kind}_strategy, --{kind}_steps) from upstream's --{kind}_every_steps when given (NEVER: off),
    else from transformers' own flags as given (unset: off; --{kind}_steps alone: every that many steps); both kinds
    given and disagreeing, steps with strategy "no", or steps not above 0, is a UserError."""
    if steps is not None and not steps > 0:  # transformers would save or evaluate never, or at every step
        raise UserError(f"--{kind}_steps must be above 0 (a number of steps, or below 1 a fraction of them), got "
                        f"{steps:g}")
    if every is None:
        if steps is None:
            return strategy or "no", default_steps
        if strategy == "no":
            raise UserError(f"--{kind}_steps {steps:g} does nothing with --{kind}_strategy no: drop one of them")
        return strategy or "steps", steps
    wanted_strategy, wanted_steps = ("steps", every) if every < NEVER else ("no", None)
    if (strategy is not None and strategy != wanted_strategy) or (steps is not None and steps != wanted_steps):
        given = " ".join(f"--{kind}_{name} {value:g}" if isinstance(value, float) else f"--{kind}_{name} {value}"
                         for name, value in (("strategy", strategy), ("steps", steps)) if value is not None)
        means = f"--{kind}_strategy steps --{kind}_steps {every}" if wanted_steps else f"--{kind}_strategy no"
        raise UserError(f"--{kind}_every_steps {every} (upstream's name for {means}) disagrees with {given}: "
                        "give one or the other")
    return wanted_strategy, default_steps if wanted_steps is None else wanted_steps


STAGING = ".staging"  # beside the final checkpoint: where it is written and verified before it is moved into place
LOCK = ".lock"


_HELD_LOCKS: dict[Path, int] = {}  # the output-directory locks this process holds: their open descriptors


def claim_output_dir(output_dir: str, overwrite: bool, inputs: tuple[str, ...] = (),
                     finished: str = "metrics.json", flag: str = "--output_dir", resuming: bool = False) -> Path:
    """Before any work: check that output_dir can take this run and lock it (call on the main process only).

    It must be a creatable, writable directory that is none of the inputs; a finished run there (the file named
    finished, which a run writes last) is kept unless overwrite; a run in progress there (its lock file flocked, or
    naming a live PID) stops this one, and a stale lock is taken over. A run that is not resuming (resuming: a
    --resume_from_checkpoint was given) does not start beside an earlier run's checkpoint-N directories, which a
    later --resume_from_checkpoint latest would take for its own: they stop it, or with overwrite are removed. The
    lock is released when this process exits. Errors name flag, the script's name for output_dir. Returns the
    directory."""
    out = check_output_dir(output_dir, flag, inputs)
    lock = out / LOCK
    def busy(holder: str) -> str:
        return f"{flag}: {out} is in use by another run (PID {holder}); wait for it or choose another {flag}"

    held = _HELD_LOCKS.pop(lock, None)  # this process's own (a second run in one process): flock is per descriptor
    fd, holder = (held, os.pread(held, 32, 0).decode(errors="replace").strip()) if held else take_lock(lock, busy)
    try:
        if holder.isdigit() and int(holder) != os.getpid() and pid_alive(int(holder)):
            raise UserError(busy(holder))  # a live process named there, whose lock is not an flock
        if (out / finished).exists() and not overwrite:
            # checkpoint-N newer than the finished run: a later --overwrite_output_dir run was killed, and can resume
            done = (out / finished).stat().st_mtime
            later = [d for d in numbered_checkpoints(out) if d.stat().st_mtime > done]
            if later:
                raise UserError(f"{flag}: {out} holds a finished run ({finished}) and {len(later)} checkpoints of a "
                                f"later, unfinished run (the last {later[-1].name}); pass --resume_from_checkpoint "
                                "latest --overwrite_output_dir to continue that run, --overwrite_output_dir alone to "
                                f"start over (they are removed), or choose another {flag}")
            raise UserError(f"{flag}: {out} holds a finished run ({finished}); pass "
                            f"--overwrite_output_dir to replace it, or choose another {flag}")
        earlier = [] if resuming else numbered_checkpoints(out)
        if earlier and not overwrite:
            raise UserError(f"{flag}: {out} holds {len(earlier)} checkpoints of an unfinished run (the last "
                            f"{earlier[-1].name}); pass --resume_from_checkpoint latest to continue it, or "
                            f"--overwrite_output_dir to start over (they are removed), or choose another {flag}")
    except UserError:
        os.close(fd)
        raise
    if holder and holder != str(os.getpid()):
        print(f"Taking over the stale lock of {out} (PID {holder} is gone)")
    own_lock(fd)
    _HELD_LOCKS[lock] = fd
    atexit.register(lambda: lock.unlink(missing_ok=True) if lock.exists() and lock.read_text() == str(os.getpid())
                    else None)
    shutil.rmtree(out / STAGING, ignore_errors=True)  # what a killed run left half-written
    if earlier:
        for directory in earlier:
            shutil.rmtree(directory)
        print(f"Removed the {len(earlier)} checkpoints of an earlier run in {out} (--overwrite_output_dir)")
    return out


def claim_and_resume(state, training_args, inputs: tuple[str, ...], kind: str, flag: str = "--output_dir",
                     written_last: Optional[str] = None) -> Optional[str]:
    """A trainer's opening, before any work: its output directory claimed on the main rank (claim_output_dir; a
    refusal stops every rank with its line, through data_parallel.on_main), then the checkpoint to resume from
    (resolve_resume for the kind it trains), or None."""
    on_main(state, lambda: claim_output_dir(training_args.output_dir, training_args.overwrite_output_dir,
                                            inputs=inputs, flag=flag,
                                            resuming=bool(training_args.resume_from_checkpoint)))
    return resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir, written_last=written_last,
                          kind=kind)


def numbered_checkpoints(directory: Path) -> list[Path]:
    """The checkpoint-N directories of a run's output directory, by N."""
    numbered = [(int(m.group(1)), d) for d in Path(directory).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                if (m := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", d.name)) and d.is_dir()]
    return [d for _, d in sorted(numbered)]


def resolve_resume(value: Optional[str], output_dir: str, marker: str = "trainer_state.json",
                   written_last: Optional[str] = None, kind: Optional[str] = None) -> Optional[str]:
    """--resume_from_checkpoint: None, 'latest' or a checkpoint directory holding marker (the Trainer's
    trainer_state.json, or LOOP_STATE); anything else is an error. 'latest' is the newest checkpoint-N of output_dir
    that is complete: marker readable (a .json one parses) and written_last (a file a callback adds after the
    Trainer's own, when given) present. A save cut short by a kill leaves a checkpoint-N without them (the Trainer
    writes into checkpoint-N directly); it is passed over, said once. kind (a key of modeling.TRAINED_KINDS): the
    model the caller trains; a checkpoint of another kind is refused (transformers would load its weights into the
    wrong head, or trace back inside the optimizer)."""
    if not value:
        return None
    if value == "latest":
        for directory in reversed(numbered_checkpoints(Path(output_dir))):
            if problem := other_kind(directory, kind):
                print(f"Passing over {directory}: {problem}")
            elif not _complete(directory, marker, written_last):
                print(f"Passing over {directory}: its save was cut short ({marker}"
                      f"{f' or {written_last}' if written_last else ''} missing or incomplete)")
            elif problem := damaged_weights(directory, marker != LOOP_STATE):
                print(f"Passing over {directory}: {problem}")
            else:
                print(f"Resuming from {directory}")
                return str(directory)
        raise UserError(f"--resume_from_checkpoint latest: {output_dir} has no complete checkpoint-N directory to "
                        "resume")
    if not os.path.isdir(value) or not os.path.isfile(os.path.join(value, marker)):
        raise UserError(f"--resume_from_checkpoint: {value} is not a periodic checkpoint directory (checkpoint-N with "
                        f"{marker})")
    if problem := other_kind(Path(value), kind):
        raise UserError(f"--resume_from_checkpoint: {value}: {problem}")
    if not _complete(Path(value), marker, written_last):  # the Trainer would trace back on it, after loading all
        raise UserError(f"--resume_from_checkpoint: {value}: its save was cut short ({marker}"
                        f"{f' or {written_last}' if written_last else ''} missing or incomplete); resume from an "
                        "earlier checkpoint-N, or pass latest (it passes over such a checkpoint)")
    if problem := damaged_weights(Path(value), marker != LOOP_STATE):
        raise UserError(f"--resume_from_checkpoint: {value}: {problem}")
    return value


def other_kind(directory: Path, kind: Optional[str]) -> Optional[str]:
    """Why a checkpoint directory holds another kind of model than kind (a key of modeling.TRAINED_KINDS), or None:
    the kind its config records, else its architecture (checkpoints saved before kinds were recorded). A directory
    without a readable config.json (a LoRA checkpoint holds an adapter config) is left to the other checks."""
    from useful_code.modeling import TRAINED_KIND, TRAINED_KINDS  # here: modeling imports torch-heavy loaders

    try:
        config = json.loads((directory / "config.json").read_text()) if kind else None
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    recorded = config.get(TRAINED_KIND)
    if recorded is not None:
        what = TRAINED_KINDS.get(recorded, (repr(recorded),))[0]
        return None if recorded == kind else f"it is a checkpoint of a {what}, not of a {TRAINED_KINDS[kind][0]}"
    wanted = "ForSequenceClassification" if kind in ("bt", "scalar_orm") else "ForCausalLM"
    architectures = config.get("architectures") or []
    if architectures and not any(a.endswith(wanted) for a in architectures):
        return f"it is a checkpoint of a {architectures[0]}, not of a {TRAINED_KINDS[kind][0]} (a ...{wanted})"
    return None


def _complete(directory: Path, marker: str, written_last: Optional[str]) -> bool:
    """Whether a checkpoint directory's save finished (see resolve_resume)."""
    if written_last and not (directory / written_last).is_file():
        return False
    try:
        text = (directory / marker).read_bytes()
        if marker.endswith(".json"):
            json.loads(text)
        return True
    except (OSError, ValueError):  # missing, or cut short mid-write
        return False


def damaged_weights(directory: Path, model_checkpoint: bool = True) -> Optional[str]:
    """What is wrong with a checkpoint directory's safetensors weights, or None: no weights at all (in a Trainer's
    model_checkpoint; a loop's LOOP_STATE checkpoint holds its tensors in that file), a shard its index lists that is
    not there, or a file shorter than its own header says (a save or a copy cut short). transformers would stop the
    resumed run on them with a traceback, after loading everything else."""
    index = directory / "model.safetensors.index.json"
    # DeepSpeed resumes from its own global_stepN states; pickled weights are another tool's, left to transformers
    # (not training_args.bin, which a plain Trainer's checkpoint holds beside its weights).
    weights = ("*.safetensors", "*.safetensors.index.json", "global_step*", "pytorch_model*.bin", "adapter_model.bin")
    if model_checkpoint and not any(next(directory.glob(pattern), None) for pattern in weights):
        return "it holds no weights (model.safetensors is missing)"
    if index.is_file():
        try:
            listed = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{index.name} cannot be read"
        missing = sorted(name for name in listed if not (directory / name).is_file())
        if missing:
            return f"{missing[0]} is missing (listed in {index.name})"
    # The Trainer's (and a loop's) own state files, torch.save's zip archives: a truncated one has no end record, and
    # torch.load would trace back on it. Not DeepSpeed's global_step*/ files, which a config may save unzipped.
    for file in sorted([*directory.glob("*.pt"), *directory.glob("*.pth")]):
        if not zipfile.is_zipfile(file):
            return f"{file.relative_to(directory)} is cut short or damaged (not a complete torch archive)"
    for file in sorted(directory.glob("*.safetensors")):
        size = file.stat().st_size
        with open(file, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little") if size >= 8 else size
            try:
                header = json.loads(f.read(header_size)) if 8 + header_size <= size else None
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, AttributeError, IndexError):
                header = None
        if header is None or size < 8 + header_size + end:
            return f"{file.name} is cut short or damaged (its safetensors header and size do not agree)"
    return None


LOOP_STATE = "loop_state.pt"


def save_loop_state(output_dir: str, step: int, state: dict) -> str:
    """A hand-written training loop's periodic checkpoint, <output_dir>/checkpoint-<step>/LOOP_STATE: tensors, numbers
    and state dicts only (torch.load reads it back with weights_only=True), written beside and moved into place."""
    final = Path(output_dir, f"checkpoint-{step}")
    staged = Path(output_dir, f".checkpoint-{step}.tmp")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    torch.save({"step": step, **state}, staged / LOOP_STATE)
    publish_dir(staged, final)
    return str(final)


def load_loop_state(checkpoint: str) -> dict:
    """What save_loop_state wrote, read with torch's weights-only loader (no arbitrary pickle)."""
    return torch.load(Path(checkpoint, LOOP_STATE), map_location="cpu", weights_only=True)


class DropPickledArguments(TrainerCallback):
    """Periodic checkpoints keep weights (safetensors, readable as the umask allows: match_umask) and training state
    (read back with torch's weights-only loader), not the pickled training_args.bin the Trainer adds: resuming never
    reads it."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir, f"checkpoint-{state.global_step}")
            (checkpoint / "training_args.bin").unlink(missing_ok=True)
            match_umask(checkpoint)


class DropDraftModelCard(TrainerCallback):
    """TRL's SFTTrainer writes a draft model card to <output_dir>/README.md at every periodic save, describing a
    text-generation model "fine-tuned from [None]"; the run's own card is last_checkpoint/README.md (model_card.py)."""

    def on_save(self, args, state, control, **kwargs):
        draft = Path(args.output_dir, "README.md")
        if state.is_world_process_zero and draft.is_file() and "generated_from_trainer" in draft.read_text():
            draft.unlink()


def staging_dir(output_dir: str) -> str:
    """Where the final checkpoint and metrics.json are written and verified before publish_run moves them."""
    return os.path.join(output_dir, STAGING)


ADAPTER_DIR = "adapter"  # with LoRA: the trained adapter (and head), beside the merged last_checkpoint/
TWO_HEADS_DIR = "two_heads"  # with ODIN: both heads, beside last_checkpoint/ (the quality head alone)
RUN_OUTPUTS = ("last_checkpoint", ADAPTER_DIR, TWO_HEADS_DIR, "curves.png", "rewards.png")  # beside metrics.json


def publish_run(output_dir: str) -> str:
    """Move the verified staging outputs (RUN_OUTPUTS that the run made) and metrics.json into place (main process
    only): the old metrics.json goes first, then every old output (a previous run's adapter is not left beside a
    new full fine-tune), and the new metrics.json comes last, so a directory with metrics.json always holds that
    run's complete, verified outputs. Returns the final checkpoint's path."""
    out, staged = Path(output_dir), Path(staging_dir(output_dir))
    match_umask(staged)
    (out / "metrics.json").unlink(missing_ok=True)
    for name in RUN_OUTPUTS:
        old, new = out / name, staged / name
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
        if new.exists():
            os.replace(new, old)
    os.replace(staged / "metrics.json", out / "metrics.json")
    staged.rmdir()
    return str(out / "last_checkpoint")


def record_reward_scale(checkpoint_dir: str, mean: float, std: float) -> None:
    """The held-out rewards' mean and standard deviation in the checkpoint's config.json under OpenRLHF's names
    (config.mean, config.std; std at least 1e-8, as its trainer clamps it): OpenRLHF's reward model, given this
    checkpoint, normalizes its rewards by them with --reward.normalize_enable, as the reward server does with
    --normalize_reward."""
    path = Path(checkpoint_dir) / "config.json"
    config = json.loads(path.read_text())
    config.update(mean=mean, std=max(std, 1e-8))
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_final_checkpoint(trainer, checkpoint_dir: str) -> None:
    """Save weights (gathered from every rank under ZeRO-3), config and tokenizer as safetensors/JSON. The
    pickled training_args.bin the Trainer adds is removed (metrics.json records the arguments): the checkpoint
    holds nothing that needs pickle to read."""
    trainer.save_model(checkpoint_dir)
    if trainer.args.process_index == 0:
        Path(checkpoint_dir, "training_args.bin").unlink(missing_ok=True)
    trainer.accelerator.wait_for_everyone()


def verify_reload(expected: np.ndarray, reloaded: np.ndarray, dtype: torch.dtype, checkpoint: str, what: str,
                  tolerance: Optional[float] = None, reference: str = "the trained model", hint: str = "") -> float:
    """Compare the outputs of a saved checkpoint, reloaded, with the reference's (the in-memory model's) on the same
    inputs and return the largest difference. dtype is the one both computed in (bf16 for bf16 weights or under
    bf16 autocast, whatever the weights' dtype: autocast rounds every matmul's output to bf16, so two forwards of
    the same weights over differently batched inputs differ at that precision). A difference above tolerance
    (default 1e-3 in fp32, 5e-2 in bf16; relative to the outputs' scale when it exceeds 1) means the checkpoint
    lost something (its head, its ZeRO-3 shards): an error, not a warning."""
    expected, reloaded = np.asarray(expected, dtype=np.float64), np.asarray(reloaded, dtype=np.float64)
    if expected.shape != reloaded.shape:
        raise RuntimeError(f"{checkpoint}: reloaded {what} have shape {reloaded.shape}, expected {expected.shape}")
    # per input (a row of a [n, 2] array: a pair's two rewards, a PM's two logits)
    broken = int((~np.isfinite(expected.reshape(len(expected), -1))).any(axis=1).sum()) if expected.size else 0
    if broken:  # the trained model itself, not its checkpoint: said so, rather than a difference of nan
        raise UserError(f"the trained model gives NaN or infinite {what} on {broken} of {len(expected)} inputs "
                        "(training diverged after its last logged step, or the dtype overflowed): nothing published")
    if tolerance is None:
        tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    max_diff = float(np.max(np.abs(reloaded - expected))) if expected.size else 0.0
    limit = tolerance * max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    if not max_diff <= limit:  # also catches NaN
        raise RuntimeError(f"saved checkpoint {checkpoint} does not reproduce {reference}: {what} differ by up to "
                           f"{max_diff:.4g} on {len(expected)} inputs (tolerance {limit:.3g}). {hint}".rstrip())
    print(f"Checkpoint verified: the reloaded {what} match {reference} (max |diff| {max_diff:.2e} on "
          f"{len(expected)} inputs)")
    return max_diff
