import os

# Before torch loads: idle OpenMP threads sleep instead of spinning (on small or busy
# machines a spinning pool can make a run several times slower).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
