"""Run folders: everything a run leaves, and reading it back.

- folder.py: claiming a folder (one live process, never another run's files), its log,
  what a failed write means;
- files.py: atomic files, checkpoints, versions and commit (what makes a folder self-contained);
- resume.py: the checks that a resumed run is the run that stopped, and its metrics trimmed;
- init_from.py: a finished run's weights as the start of another run or of metarun-predict.

Import from the modules: `metarun.cli` reads `folder.py` before anything heavy loads, so a
refused command answers without importing torch.
"""
