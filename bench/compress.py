"""LZ77 compression in a CPL3 guest against native: `python -m bench.compress [--quick]`.

One half of bench.compute (which see): bench/kernels/lz_kernel.c in firmware/compress.c and in
bench/native_compress.c, the "gzip" row of the 2007 benchmark.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.compute import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_only="compress"))
