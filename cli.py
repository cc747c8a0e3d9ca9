"""Command line: ``python -m asyndm_fpdm {asyn,fpdm,demo} ...``.

Each subcommand lives beside its engine; this file only dispatches, so ``--help`` stays fast.
"""

import argparse
import os
import sys

# Before torch loads (the console script enters here): idle OpenMP threads sleep instead of spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) > 1 and argv[0] == "fpdm":
        from .fpdm import cli as fpdm_cli

        if argv[1] in fpdm_cli.TOOLS:  # fpdm features / fpdm train; plain `fpdm --checkpoint ...` samples
            args = fpdm_cli.tool_parser(argv[1]).parse_args(argv[2:])
            return int(args.run(args) or 0)
    parser = argparse.ArgumentParser(
        prog="python -m asyndm_fpdm",
        description="AsynDM (asynchronous diffusion) and FPDM (fixed point diffusion) from the command line.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from .samplers import cli as asyn_cli
    from .fpdm import cli as fpdm_cli
    from . import demo

    asyn_cli.add_parser(sub)
    fpdm_cli.add_parser(sub)
    demo.add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
