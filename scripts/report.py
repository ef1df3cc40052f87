"""The repository's wrapper of `metarun-report` (metarun/report/), kept for old commands:

python scripts/report.py outputs/multirun/protaugment --update docs/RESULTS.md
"""

from metarun.report.cli import main

if __name__ == "__main__":
    main()
