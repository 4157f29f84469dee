"""What users call: the command line (cli), the Python API (api), sweeps and plots. Nothing below imports it."""
