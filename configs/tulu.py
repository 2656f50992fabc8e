"""Tulu 3 8B SFT (Lambert et al., 2024): Llama 3.1 8B on the Tulu 3 SFT mixture.

    python -m jsft.train --config=configs/tulu.py

Published recipe: lr 5e-6, linear schedule with 3% warmup, no weight decay, 2 epochs, sequences of
4096 tokens, 128 conversations per optimizer step and *sum* loss reduction. `train.batch_unit =
"examples"` reproduces the step: exactly 128 conversations, packed into as few 4096-token rows as they
need (the row count rounded up to a multiple of the batch-sharded devices), so steps per epoch equal
conversations / 128 as in the reference run, and `sum` weights each step by the tokens it holds.

`sum` vs `mean` does not call for another learning rate: AdamW's update is unchanged when a step's
gradient is scaled by one constant (up to eps). They differ in how steps with different token counts
are weighted against each other, and where clipping acts (this config does not clip, as open-instruct).
Measured on the tiny model (`tools/bench/loss_reduction.py`): at one lr, mean and sum reach the same
held-out loss (within 0.3%), with constant and with varying tokens per step.

The mesh shards the model fully (FSDP over all devices), which fits an 8B model in bfloat16 compute
with float32 parameters and moments on a TPU v5p-64/v4-64 slice or 8x H100 nodes.
"""

from jsft.config import default_config


def get_config():
    c = default_config()
    c.output_dir = "runs/tulu3-8b-sft"
    c.model.path = "meta-llama/Llama-3.1-8B"  # a Hub id (fetched into the HF cache) or a local folder
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    # Keep the projections' outputs, recompute norms, RoPE and attention: 2 rows x 4096 tokens per
    # device save 43k bfloat16 values per token per layer, 0.7 GB per layer, 23 GB for 32 layers.
    # `tools/bench/memory.py --config=configs/tulu.py --devices=64` (compiled on simulated devices, an
    # upper estimate): 49.6 GiB per device with minimal, 12.3 with full, 293 with none.
    c.model.remat = "minimal"
    c.data.mixer = (("allenai/tulu-3-sft-mixture", 1.0),)
    c.data.chat_template = "tulu"
    c.data.max_seq_length = 4096
    c.data.packing = True
    c.train.batch_unit = "examples"
    c.train.global_batch_size = 128  # conversations per step
    c.train.grad_accum_steps = 1
    c.train.epochs = 2
    c.train.seed = 8
    c.train.loss_reduction = "sum"
    c.optim.lr = 5e-6
    c.optim.schedule = "linear"
    c.optim.warmup_ratio = 0.03
    c.optim.weight_decay = 0.0
    c.optim.clip_grad_norm = 0.0  # open-instruct default: no clipping
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 3
    c.log.every_steps = 10
    return c
