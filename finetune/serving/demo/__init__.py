"""The demo page (gradio) over finetune.serving.engine: `build_app(engine, concurrency_limit, queue_size)` returns
the Blocks, `launch(app, host, port, auth, block)` serves it, `mount(server, app, path, auth)` puts it on another
FastAPI app (`finetune serve`) with the same options. gradio is imported only when a page is built."""

from finetune.serving.demo.app import build_app, launch, mount, page_options

__all__ = ["build_app", "launch", "mount", "page_options"]
