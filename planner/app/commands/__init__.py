"""One module per command of the command line, each with `register(sub)` adding its parser and handler;
planner/app/cli.py builds the parser from them. Shared below them: output (what a command prints), flags
(list and document flag values) and torch_backend (validate's and calibrate's check)."""
