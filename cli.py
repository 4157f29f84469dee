#!/usr/bin/env python3
"""Checkout entry point: `python cli.py ...` is the same as the installed `planner` command."""
import sys

from planner.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
