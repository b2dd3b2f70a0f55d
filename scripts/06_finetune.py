#!/usr/bin/env python
"""Stage: `ptl finetune` (two-stage fine-tuning). Same options; run with --help to list them."""

from pyimagesearch_tl.cli import run_script

if __name__ == "__main__":
    run_script("finetune")
