"""The `vllm.general_plugins` entry point (pyproject.toml): vLLM calls `register()` in every process
it starts. It replaces vLLM's Medusa model (architecture "MedusaModel") with TruncatedMedusa,
which serves heads trained on a truncated vocabulary at their truncated cost and behaves exactly as
vLLM's own class for every other Medusa folder.

To run vLLM's own class (e.g. to time the widened heads), leave the plugin out: VLLM_PLUGINS=none
(vLLM loads only the plugins that variable names).
"""

from __future__ import annotations

ARCHITECTURE = "MedusaModel"


def register() -> None:
    from medusaforge.serving.vllm import check_vllm_version

    check_vllm_version()
    from vllm import ModelRegistry

    # A "module:Class" string: vLLM imports it lazily, in the process that builds the model.
    ModelRegistry.register_model(ARCHITECTURE, "medusaforge.serving.vllm.truncated_medusa:TruncatedMedusa")
