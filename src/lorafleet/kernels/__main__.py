"""`python -m lorafleet.kernels`: build the CPU kernels now (make install runs it) and say where."""

from __future__ import annotations

import sys

from lorafleet import kernels
from lorafleet.kernels import build


def main() -> int:
    if not build.enabled():
        print(f"lorafleet kernels: disabled by ${build.ENV_SWITCH}")
        return 0
    if kernels.available():
        print(f"lorafleet kernels: ready in {build.kernels_dir() / build.build_tag()}")
        return 0
    # Not an install failure: every caller falls back to torch's kernels.
    print(f"lorafleet kernels: unavailable ({kernels.unavailable_reason()}); torch's kernels run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
