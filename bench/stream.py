"""Memory bandwidth in a CPL3 guest against native: `python -m bench.stream [--quick]`.

One half of bench.compute (which see): STREAM's copy/scale/add/triad on uint64_t and double,
bench/kernels/stream_kernel.c in firmware/stream.c and in bench/native_stream.c.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.compute import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_only="stream"))
