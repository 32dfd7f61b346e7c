"""Model configs, blocks, the language model and checkpoint formats."""

from ssmkit.models.checkpoint import CheckpointError, save_pretrained  # noqa: E402,F401
from ssmkit.models.config import PRESETS, ModelConfig  # noqa: E402,F401
from ssmkit.models.lm import LanguageModel, LMOutput, from_pretrained  # noqa: E402,F401
from ssmkit.models.quantize import QUANTIZE_MODES, quantize  # noqa: E402,F401  (the function, not the module)
from ssmkit.models.tokenizer import ByteTokenizer, load_tokenizer  # noqa: E402,F401
