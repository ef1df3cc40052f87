"""Faults injected into a `metarun` subprocess (PYTHONPATH=tests/faults), chosen by
METARUN_TEST_FAULT: what a full disk or a read-only folder does to a real run.

- enospc: flushing a file over 64 KiB to disk fails as on a full disk (checkpoints do; the
  small JSON files still fit, as they often do on a disk that has just filled up).
- enospc-torch: torch.save fails as it does on a full disk: a RuntimeError whose cause is the
  OSError (the writer is C++; the Python error reaches metarun only as the cause).
- erofs: creating a folder whose path contains "readonly" fails as on a read-only mount.
"""

import errno
import os
import pathlib

FAULT = os.environ.get("METARUN_TEST_FAULT")

if FAULT == "enospc":
    _fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.fstat(fd).st_size > 65536:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _fsync(fd)

    os.fsync = fsync

if FAULT == "erofs":
    _mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if "readonly" in str(self):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return _mkdir(self, *args, **kwargs)

    pathlib.Path.mkdir = mkdir

if FAULT == "enospc-torch":
    import torch

    _save = torch.save

    def save(obj, f, *args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as err:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from err

    torch.save = save
