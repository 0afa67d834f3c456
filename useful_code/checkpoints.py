"""Checkpoints: the final save, the one reload verification every trainer and the ArmoRM export use, and the
metrics every training run records."""

from __future__ import annotations

import atexit
import fcntl
import glob
import importlib.metadata
import json
import os
import re
import shutil
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from useful_code.cli import UserError
from useful_code.hardware import peak_gpu_memory_mib
from useful_code.model_card import launch_command

# Training arguments recorded in metrics.json: those that decide the trained weights (the full set is hundreds of
# fields; metrics.json also keeps the command line and the recipe).
RECORDED_TRAINING_ARGS = ("output_dir", "learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
                          "gradient_accumulation_steps", "num_train_epochs", "max_steps", "max_length", "packing",
                          "packing_strategy", "group_by_length", "dataloader_drop_last", "lr_scheduler_type",
                          "lr_scheduler_kwargs", "warmup_steps", "weight_decay", "max_grad_norm", "optim", "optim_args",
                          "adam_beta1", "adam_beta2", "adam_epsilon", "activation_checkpointing", "bf16", "fp16",
                          "seed", "data_seed", "full_determinism", "deepspeed")


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def check_output_file(path: str, flag: str, inputs: tuple = ()) -> None:
    """Before any work: an output file's path must not be a directory, one of the inputs or inside an input directory
    (a model's or a dataset's: results written there replaced a checkpoint's weights or config), and its directory
    must be creatable and writable: a probe file is written beside it, and an existing file opened for appending
    (permission bits do not tell: root passes os.access, and /proc refuses new files)."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise UserError(f"{flag}: {target} is a directory; give a file path")
    for given in (p for p in inputs if p):
        source = Path(given).expanduser().resolve()
        if target.resolve() == source:
            raise UserError(f"{flag}: {target} is an input of this run")
        if source.is_dir() and source in target.resolve().parents:
            raise UserError(f"{flag}: {target} is inside {given}, an input of this run; write it elsewhere")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{flag}: cannot create {target.parent} ({err.strerror})") from None
    probe = target.with_name(f".{target.name}.write-test-{os.getpid()}")
    try:
        probe.write_text("")
        probe.unlink()
        if target.exists():
            os.close(os.open(target, os.O_WRONLY | os.O_APPEND))
    except OSError as err:
        raise UserError(f"{flag}: cannot write {target} ({err.strerror})") from None


def check_output_dir(path, flag: str, inputs: tuple = ()) -> Path:
    """Before any work: an output directory must not be a file or one of the inputs, and must be creatable and
    writable (it is created). Returns it."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag}: {out} is a file, not a directory")
    if any(Path(p).expanduser().resolve() == out.resolve() for p in inputs if p):
        raise UserError(f"{flag}: {out} is also an input of this run")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{flag}: cannot write to {out} ({err.strerror})") from None
    return out


_HELD_LOCKS: dict[Path, int] = {}  # the output-directory locks this process holds: their open descriptors


def take_lock(lock: Path, busy: Callable[[str], str]) -> tuple[int, str]:
    """An exclusive flock on the file lock (created if missing), held until its descriptor is closed or this process
    ends (a kill -9 included): taking it is one atomic step, so two runs started together cannot both hold it.
    Returns the descriptor and what the file named before (a killed holder's PID, or ''); the caller writes its own
    PID with own_lock. A lock another process holds is UserError(busy(its PID))."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(busy(holder or "?")) from None
        # A holder that let go may have removed the file between our open and our flock: lock the file now there.
        try:
            same = os.path.samestat(os.stat(lock), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if same:
            return fd, holder
        os.close(fd)


def own_lock(fd: int) -> None:
    """Write this process's PID into a lock file it holds (take_lock)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)


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
        if holder.isdigit() and int(holder) != os.getpid() and _pid_alive(int(holder)):
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
    for file in sorted([*directory.rglob("*.pt"), *directory.rglob("*.pth")]):  # torch.save's zip archives
        if not zipfile.is_zipfile(file):  # a truncated one has no end record: torch.load traces back on it
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


def match_umask(path) -> None:
    """The file at path, or every safetensors file under the directory path, gets the mode the umask gives any new
    file. safetensors 0.8 writes 0600 (its temporary file's mode, safetensors issue #782), so another user, a reward
    server or vLLM running as someone else could not read a trained model, while its config could be read."""
    mask = os.umask(0)
    os.umask(mask)
    path = Path(path)
    for file in ([path] if path.is_file() else path.rglob("*.safetensors")):
        file.chmod(0o666 & ~mask)


def _write_beside(path, write) -> None:
    """write(staged path) beside path, flushed to disk, then renamed into place: a killed write never leaves a
    truncated file under the real name, a failed one leaves no staged file behind, and a killed one's is removed by
    the next write of that path."""
    path = Path(path)
    staged = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    for left in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):  # a killed write's (its PID is gone)
        pid = left.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            left.unlink(missing_ok=True)
    try:
        write(staged)
        match_umask(staged)
        with open(staged, "rb") as f:
            os.fsync(f.fileno())
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def atomic_save_file(tensors: dict, path, metadata: Optional[dict] = None) -> None:
    """safetensors' save_file, written atomically (_write_beside)."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    _write_beside(path, lambda staged: save_file(tensors, str(staged), metadata=metadata))


def atomic_write_text(path, text: str) -> None:
    """write_text (UTF-8), written atomically (_write_beside)."""
    _write_beside(path, lambda staged: staged.write_text(text, encoding="utf-8"))


def atomic_write_lines(path, lines) -> None:
    """The strings of an iterable written one after another (UTF-8), as they come (a file larger than memory), and
    atomically (_write_beside): an error while they are made leaves the old file, if any, in place."""
    def write(staged: Path) -> None:
        with open(staged, "w", encoding="utf-8") as f:
            f.writelines(lines)

    _write_beside(path, write)


def save_dataset(dataset, output_path: str, flag: str) -> None:
    """Write a dataset by the output's extension, atomically: JSON lines (.json/.jsonl, UTF-8 as is), parquet, or
    else a DatasetDict directory (save_to_disk, its one split 'train'), written beside and renamed into place. A
    failed write (a full disk) is one line naming flag, and leaves the old output, if any, in place."""
    from datasets import DatasetDict

    path = Path(output_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if path.suffix in (".json", ".jsonl"):
            _write_beside(path, lambda staged: dataset.to_json(str(staged), lines=True, force_ascii=False))
        elif path.suffix == ".parquet":
            _write_beside(path, lambda staged: dataset.to_parquet(str(staged)))
        else:
            staged = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            shutil.rmtree(staged, ignore_errors=True)
            try:
                DatasetDict({"train": dataset}).save_to_disk(str(staged))
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            publish_dir(staged, path)
    except OSError as err:
        raise UserError(f"{flag}: cannot write {output_path}: {err.strerror or err}") from None


def publish_dir(staged, final) -> None:
    """Replace the directory final with the verified directory staged (its weights readable as the umask allows)."""
    match_umask(staged)
    if Path(final).exists():
        shutil.rmtree(final)
    os.replace(staged, final)


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


def write_run_metrics(output_dir: str, metrics: dict, started: float, train_result, script_args, training_args,
                      precision: str, resumed_from: Optional[str] = None) -> str:
    """Add what every training run records (losses, steps, timings, world size, precision: the weights' and the
    compute's dtypes as distributed.precision_summary gives them, the arguments, the command line, library versions)
    to the script's own metrics and write <output_dir>/metrics.json; return its path. A run resumed from a
    checkpoint records where; its train_loss is null, since transformers averages the loss over the steps of this
    process only (0 when none were left), and that mean is kept as resumed.train_loss_of_these_steps."""
    training = training_args.to_dict()
    train_loss, resumed = train_result.training_loss, None
    if resumed_from:
        at_step = json.loads((Path(resumed_from) / "trainer_state.json").read_text())["global_step"]
        resumed = {"from": str(resumed_from), "at_step": at_step,
                   "train_loss_of_these_steps": train_loss if train_result.global_step > at_step else None}
        train_loss = None
    metrics = {
        "train_loss": train_loss,
        "train_steps": train_result.global_step,
        **({"resumed": resumed} if resumed else {}),
        **metrics,
        "wall_time_s": round(time.time() - started, 1),
        "train_runtime_s": train_result.metrics.get("train_runtime"),
        "world_size": training_args.world_size,
        "peak_gpu_memory_mib": peak_gpu_memory_mib(),  # this rank's; None on a CPU
        "dtype": precision,
        "arguments": {**asdict(script_args), **{k: training[k] for k in RECORDED_TRAINING_ARGS if k in training}},
        "command": launch_command(),
        "versions": library_versions(),
    }
    path = os.path.join(output_dir, "metrics.json")
    with open(path, "w") as f:
        json.dump(metrics, f, indent=2)
    return path


def library_versions() -> dict[str, str]:
    """Versions that decide a result, recorded with every run."""
    versions = {"python": sys.version.split()[0]}
    for package in ("torch", "transformers", "deepspeed", "datasets", "accelerate", "trl"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
