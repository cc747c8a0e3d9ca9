"""``python -m asyndm_fpdm demo``: the whole pack end to end on tiny random models, no downloads.

It proves an install works: AsynDM (vanilla / DMconcave / AsynDM with masks and timestep maps)
through the same CLI a user runs on a real Stable Diffusion folder, and FPDM sampling of a
tiny random fixed-point DiT with the same budget spent three ways. Random weights draw noise,
not pictures; the numbers printed are what to look at.
"""

import os
import sys
import tempfile
import time


def add_parser(sub):
    p = sub.add_parser("demo", help="run AsynDM and FPDM end to end on tiny random models (no downloads)")
    p.add_argument("--out", default="outputs/demo", help="folder for the PNGs")
    p.add_argument("--steps", type=int, default=10)
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from .samplers import cli as asyn_cli
    from .tiny import save_tiny_pipeline

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as model_dir:
        save_tiny_pipeline(model_dir)
        out = os.path.join(args.out, "asyndm")
        rc = asyn_cli.main_args(
            ["--model", model_dir, "--prompt", "a rabbit playing basketball", "--targets", "rabbit:0.7, basketball:0.7",
             "--steps", str(args.steps), "--eta", "0", "--out", out]
        )
        if rc:
            return rc
    print(f"AsynDM: vanilla, DMconcave and AsynDM images, masks and timestep maps in {out}/ "
          f"({time.perf_counter() - t0:.1f} s)")
    from .fpdm import demo as fpdm_demo

    return fpdm_demo.run(os.path.join(args.out, "fpdm"), steps=args.steps)


if __name__ == "__main__":
    sys.exit(run(type("A", (), {"out": "outputs/demo", "steps": 10})()))
