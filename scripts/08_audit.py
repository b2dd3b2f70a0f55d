#!/usr/bin/env python
"""Stage: `ptl audit` (near-duplicate leaks, likely label errors, outliers). Same options; run with --help."""

from pyimagesearch_tl.cli import run_script

if __name__ == "__main__":
    run_script("audit")
