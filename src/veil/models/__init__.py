"""Model frontends: well-known models as veil graphs that every mode runs.

- :mod:`veil.models.minilm`: all-MiniLM-L6-v2 sentence embeddings (needs ``veil[hf]``).
- :mod:`veil.models.llama`: a Llama decoder (llama2.c checkpoints) as one graph per generation step,
  the key/value cache as explicit inputs and outputs.
- :mod:`veil.models.gpt2`: Hugging Face GPT-2 models exported through ONNX (needs ``veil[hf]``).
- :mod:`veil.models.hf`: any Hugging Face model on static token ids (``veil.load_model`` routes them here).
- :mod:`veil.models.secure`: the frontends under mpc with five local processes (``veil mpc encode/generate``).

Submodules are imported on use (they pull in torch/transformers).
"""

__all__ = ["minilm", "llama", "gpt2", "hf", "secure"]
