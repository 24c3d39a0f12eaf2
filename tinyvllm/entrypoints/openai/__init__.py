"""The OpenAI-compatible server (`tinyvllm serve`): api_server.py builds the app; protocol.py holds
the request/response models; serving_completion.py and serving_chat.py the two generation endpoints;
serving_engine.py what they share; metrics.py the Prometheus metrics. Needs the `serve` extra."""
