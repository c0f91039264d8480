"""``python -m datamodules.mimic ROOT --out COHORT``: same as ``medrec-prepare``."""

from datamodules.mimic.cli import main

main()
