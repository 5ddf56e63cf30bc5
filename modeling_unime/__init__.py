"""UniME for 🤗 Transformers: `UniMEConfig`, `UniMEModel`, `UniMEProcessor`.

Importing the package registers the classes with `AutoConfig`, `AutoModel` and `AutoProcessor`
in this process; saved checkpoints carry the same files for `trust_remote_code=True` loading.
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .configuration_unime import UniMEConfig
from .modeling_unime import UniMEModel, UniMEModelOutput, UniMEPreTrainedModel
from .processing_unime import UniMEProcessor

__all__ = ["UniMEConfig", "UniMEModel", "UniMEModelOutput", "UniMEPreTrainedModel", "UniMEProcessor"]

UniMEConfig.register_for_auto_class()
UniMEModel.register_for_auto_class("AutoModel")
UniMEProcessor.register_for_auto_class("AutoProcessor")
AutoConfig.register("unime", UniMEConfig, exist_ok=True)
AutoModel.register(UniMEConfig, UniMEModel, exist_ok=True)
AutoProcessor.register(UniMEConfig, UniMEProcessor, exist_ok=True)
