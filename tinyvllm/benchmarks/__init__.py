"""Benchmarks that ship with the package (`tinyvllm bench ...`): serve.py measures a running server."""
