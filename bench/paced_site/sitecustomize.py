"""Imported by Python at start-up when this folder is on PYTHONPATH (bench/paced_step.py's ``env()``):
with TINYVLLM_BENCH_PACED set, every model step of this process waits as long as an H100's."""

import os
import sys

if os.environ.get("TINYVLLM_BENCH_PACED"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # (bench/)
    import paced_step

    paced_step.install()
    sys.path.pop(0)
