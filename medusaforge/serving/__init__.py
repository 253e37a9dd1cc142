"""Serving engines running what medusaforge trains. Each engine has its own subpackage, the only
place that imports the engine (serving/vllm/: vLLM)."""
