"""Serving stage: the inference engine (one base, many adapters, prompts rendered as in training) that the demo
and the HTTP server share."""
