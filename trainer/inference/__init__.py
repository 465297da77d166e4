"""Using a fine-tuned model: load a run's adapter onto its base as it was trained, generate, evaluate.

- ``trained``: a run directory (or adapter directory) -> the adapted model, its tokenizer and the data
  format it was trained on, with clear errors for what is missing;
- ``generate``: prompts rendered with the run's own template, tokens streamed as they come;
- ``evaluate``: token loss and perplexity over a file in the run's format, with generation exact match.
"""

from trainer.inference.evaluate import EvalReport, evaluate_file
from trainer.inference.generate import GenerationSettings, generate, read_prompts
from trainer.inference.trained import InferenceError, TrainedModel, load_trained

__all__ = [
    "EvalReport",
    "GenerationSettings",
    "InferenceError",
    "TrainedModel",
    "evaluate_file",
    "generate",
    "load_trained",
    "read_prompts",
]
