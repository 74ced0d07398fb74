"""The finetune demo as a standalone app file (the Spaces-style entry point): the page itself lives in the package,
finetune/serving/demo/ (see docs/demo.md), so `finetune demo` works from an installed package too.

    python demo/app.py adapters/my-run [adapters/other ...] [--base MODEL] [--port 7860]

is the same as `finetune demo ...`. From Python: `build_app(engine)` returns the Blocks, `launch(app, ...)` serves it.
"""

from __future__ import annotations

import sys

from finetune.serving.demo import build_app, launch

__all__ = ["build_app", "launch"]

if __name__ == "__main__":
    from finetune.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
