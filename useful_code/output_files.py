"""Where outputs go and how they are written: output paths checked before any work, lock files, and writes that are
atomic (written beside the target, flushed, renamed into place) and readable as the umask allows."""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from useful_code.cli import UserError


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID is running (a lock's or a staged file's writer)."""
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
        if pid.isdigit() and not pid_alive(int(pid)):
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
    from safetensors.torch import save_file  # here: this module is imported by scripts that never load torch
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
