"""`python -m offsite_ds <command>`: what the `deepspeed --module offsite_ds ...` launcher runs on every rank."""
import sys

from offsite_ds.cli import main

sys.exit(main())
