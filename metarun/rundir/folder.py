"""A run folder belongs to one run: claimed before anything is written, never appended to by
another run, and left byte-identical when a command is refused.

Hydra writes nothing into the folder itself (conf/config.yaml turns its `.hydra/` and log file
off); once the folder is claimed, experiment.open_run_dir writes them, so a refused resume or a
folder that holds another run is never touched.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from metarun.errors import MetarunError

log = logging.getLogger("metarun")
STATE_FILE = "last.pt"  # the resumable state; checkpoint.pt stays the best-validation weights
# Files a run leaves; any of them without a resumable state means the folder holds another run.
RUN_FILES = ("summary.json", "metrics.jsonl", "config.yaml", "checkpoint.pt",
             "test_episodes.json", "environment.json", STATE_FILE)  # fmt: skip
MODES = ("auto", "overwrite")
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # as Hydra's default
# Where the run's own record of errors goes: the folder's metarun.log only, not the terminal
# (the CLI prints its one line there).
file_log = logging.getLogger("metarun.runlog")
file_log.propagate = False
file_log.addHandler(logging.NullHandler())  # processes without a run folder: nowhere


LOCK_FILE = ".metarun.lock"  # holds the pid of the process that owns the folder


class FolderLock:
    """An exclusive lock on a run folder for as long as one process uses it.

    `flock` on a lock file inside the folder: the kernel releases it when the process dies,
    however it dies, so a stale file never blocks anyone. The file is removed when the lock is
    released (a refused command leaves the folder as it found it); a process that locked a file
    another one had just removed sees that its path no longer names the locked file, and tries
    again.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise MetarunError(
                    f"run_dir={self.path.parent} is in use by another metarun process (pid "
                    f"{holder}); wait for it to end, or choose another run_dir"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # locked a file its owner had just removed: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked: nobody takes a dying file
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def run_files(run_dir: Path) -> list[str]:
    """The files of a run that `run_dir` already holds."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def claim(run_dir: Path, mode: str, resuming: bool) -> str:
    """How this command may use `run_dir`: "fresh", "resume" or "overwrite". Writes nothing;
    refuses a folder that holds another run's files and no state to resume."""
    if mode not in MODES:
        raise MetarunError(f"run_dir_mode={mode}; use auto or overwrite")
    if not run_dir.exists():
        return "fresh"
    if not run_dir.is_dir():
        raise MetarunError(f"run_dir={run_dir} is a file, not a folder; choose another run_dir")
    found = run_files(run_dir)
    if mode == "overwrite":
        return "overwrite" if found else "fresh"
    if (run_dir / STATE_FILE).is_file():
        return "resume"
    if resuming:
        raise MetarunError(f"train.resume={run_dir}: there is no {STATE_FILE} in it to resume from")
    if found:
        raise MetarunError(
            f"run_dir={run_dir} holds another run ({', '.join(found)}) with no {STATE_FILE} to "
            "resume from; choose another run_dir, or start afresh there with "
            "run_dir_mode=overwrite (deletes that run's files)"
        )
    return "fresh"


def clear(run_dir: Path) -> None:
    """run_dir_mode=overwrite: remove what an earlier run left (its W&B folder stays)."""
    for name in (*RUN_FILES, "metarun.log"):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
    log.info("run_dir_mode=overwrite: removed the earlier run's files from %s", run_dir)


def remove_stale_tmp(run_dir: Path) -> None:
    """`*.tmp` files of a run killed mid-write (or by a full disk) hold space and nothing else."""
    for tmp in run_dir.glob("*.tmp"):
        tmp.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted write", tmp.name)


def write_hydra_files(run_dir: Path, cfg: DictConfig) -> None:
    """What Hydra would have written into `.hydra/`: the composed config (unresolved, as the
    job received it), Hydra's own, and the command's overrides."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.instance().cfg  # only the `hydra` node: the job's config is `cfg`
    out = run_dir / ".hydra"
    out.mkdir(exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(hydra_cfg, out / "hydra.yaml")
    OmegaConf.save(hydra_cfg.hydra.overrides.task, out / "overrides.yaml")


def attach_log(run_dir: Path) -> logging.Handler:
    """metarun.log in the run folder: every line this process logs, and the error if it fails."""
    handler = logging.FileHandler(run_dir / "metarun.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    file_log.addHandler(handler)
    return handler


def detach_log(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    file_log.removeHandler(handler)
    handler.close()


DISK_ERRORS = {
    errno.ENOSPC: "the disk is full: free space (or point run_dir at another disk)",
    errno.EDQUOT: "the disk quota is exceeded: free space (or point run_dir at another disk)",
    errno.EROFS: "the file system is read-only: choose a writable run_dir (or hydra.run.dir)",
    errno.EACCES: "permission denied: choose a writable run_dir (or hydra.run.dir)",
    errno.EPERM: "permission denied: choose a writable run_dir (or hydra.run.dir)",
}


def os_error_message(err: OSError) -> str | None:
    """One line for a failure to write: which file, why, what to do; None if it is not one."""
    fix = DISK_ERRORS.get(err.errno or 0)
    if fix is None:
        return None
    where = f" {err.filename}" if err.filename else ""
    return f"cannot write{where}: {fix}; files written before are kept"
