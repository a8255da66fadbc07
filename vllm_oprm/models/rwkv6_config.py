"""The Hugging Face config class for ``model_type: rwkv6`` (transformers has none).

Kept apart from the model so the plugin can register it in every vLLM process
without importing torch layers. Fields are whatever the checkpoint's
config.json holds; the model reads them through the reference ``Rwkv6Config``.
"""

from transformers import PretrainedConfig


class Rwkv6HFConfig(PretrainedConfig):
    model_type = "rwkv6"
