"""Print docs/environments.md: `python tests/hostile/render_table.py > docs/environments.md`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from matrix import render  # noqa: E402

if __name__ == "__main__":
    sys.stdout.write(render())
