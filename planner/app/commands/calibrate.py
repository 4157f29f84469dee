"""`planner calibrate`: measure this machine into the user's own `local` cluster preset (torch backend)."""
from __future__ import annotations

from planner.app.commands.output import emit
from planner.app.commands.torch_backend import require_torch
from planner.core.errors import BadInput


def cmd_calibrate(args) -> None:
    require_torch(args)
    from planner.backends.torch.calibrate import calibrate, report_text
    from planner.backends.torch.validate import usable_cores

    if args.nproc is not None and args.nproc < 2:
        raise BadInput(f"--nproc must be at least 2 (collectives need two processes), got {args.nproc}")
    # one rank per core (or GPU) is what a plan runs; four per core already measures only contention
    cap = 4 * max(1, usable_cores())
    if args.nproc is not None and args.nproc > cap:
        raise BadInput(f"--nproc {args.nproc}: at most {cap} (4 per usable core) on this machine; "
                       "leave it out for one process per core")
    if args.out_dir == "":
        raise BadInput("--out-dir is empty; give a folder, or leave --out-dir out for your data folder")
    res = calibrate(nproc=args.nproc, quick=args.quick, out_dir=args.out_dir, force=args.force,
                    dry_run=args.dry_run)
    emit(res, args.json, report_text(res))


def register(sub) -> None:
    """Adds `calibrate`: writes into the user's data folder, or --out-dir."""
    ca = sub.add_parser(
        "calibrate", help="measure this machine into your own `local` cluster preset (start with --quick)",
        description="Measure this machine (torch) and write the `local` device, link and node profile into your "
                    "data folder (platformdirs: $XDG_DATA_HOME or ~/.local/share/parallel-planner/calibration), "
                    "never into the package. Start with `planner calibrate --backend torch --quick` (about 2 "
                    "minutes on 2 cores); a full calibration takes about 6 minutes there and prints its progress.")
    ca.add_argument("--backend", default="torch", help="measurement backend (torch)")
    ca.add_argument("--nproc", type=int, help="processes for the collective measurements (default: the cores, >= 2)")
    ca.add_argument("--quick", action="store_true",
                    help="the first step: fewer shapes and sizes, about 2 minutes "
                         "(a first look, not a profile to trust)")
    ca.add_argument("--out-dir", metavar="DIR",
                    help="write devices/ links/ nodes/ and calibration.json under DIR (created) instead of your data "
                         "folder; plan on it with --cluster DIR")
    ca.add_argument("--force", action="store_true", help="replace an existing full calibration (a --quick one is "
                                                         "replaced without it)")
    ca.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    ca.add_argument("--json", action="store_true")
    ca.set_defaults(func=cmd_calibrate)
