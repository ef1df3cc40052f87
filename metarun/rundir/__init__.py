"""Run folders: everything a run leaves, and reading it back.

- folder.py: claiming a folder (one live process, never another run's files), its log,
  what a failed write means;
- files.py: atomic files, checkpoints, versions and commit (what makes a folder self-contained);
- resume.py: the checks that a resumed run is the run that stopped, and its metrics trimmed;
- init_from.py: a finished run's weights as the start of another run or of metarun-predict.
"""

from metarun.rundir.files import (
    atomic,
    finite,
    git_commit,
    load_checkpoint,
    save_checkpoint,
    versions,
    write_json,
)
from metarun.rundir.folder import (
    LOCK_FILE,
    RUN_FILES,
    STATE_FILE,
    FolderLock,
    attach_log,
    claim,
    clear,
    detach_log,
    file_log,
    os_error_message,
    remove_stale_tmp,
    run_files,
    write_hydra_files,
)
from metarun.rundir.resume import check_same_data, check_same_run, trim_metrics

__all__ = [
    "LOCK_FILE", "RUN_FILES", "STATE_FILE", "FolderLock", "atomic", "attach_log",
    "check_same_data", "check_same_run", "claim", "clear", "detach_log", "file_log", "finite",
    "git_commit", "load_checkpoint", "os_error_message", "remove_stale_tmp", "run_files",
    "save_checkpoint", "trim_metrics", "versions", "write_hydra_files", "write_json",
]  # fmt: skip
