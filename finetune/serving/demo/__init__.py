"""The demo page (gradio) over finetune.serving.engine: `build_app(engine, concurrency_limit, queue_size)` returns
the Blocks, `launch(app, host, port, auth, block)` serves it. Used by `finetune demo`, demo/app.py and the server.
gradio is imported only when a page is built."""

from finetune.serving.demo.app import build_app, launch

__all__ = ["build_app", "launch"]
