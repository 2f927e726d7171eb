"""imagebatch: publish AI-generated images every night through slow, quota-limited image APIs.

The core (this package) knows nothing of Prefect; ``flows/`` and ``tasks/`` orchestrate it.
"""

from imagebatch.batch import BatchRun, BatchSummary
from imagebatch.config import BatchConfig, load_config
from imagebatch.models import GeneratedImage, Prompt, PromptRecord
from imagebatch.prompts import load_prompts

__all__ = [
    "BatchConfig",
    "BatchRun",
    "BatchSummary",
    "GeneratedImage",
    "Prompt",
    "PromptRecord",
    "load_config",
    "load_prompts",
]
__version__ = "0.1.0"
