"""Tulu 3 70B SFT (Lambert et al., 2024): Llama 3.1 70B on the Tulu 3 SFT mixture.

    python -m jsft.train --config=configs/tulu_70b.py

Published recipe (open-instruct's docs/tulu3.md, the command that produced
allenai/Llama-3.1-Tulu-3-70B-SFT): lr 2e-6 (5e-6 for 8B),
linear schedule with 3% warmup, no weight decay, 2 epochs, sequences of 4096 tokens, an effective
batch of 128 conversations (64 GPUs x 1 x 2 accumulation steps), sum loss reduction, seed 456, no
gradient clipping. As in `configs/tulu.py`, `batch_unit = "examples"` makes a step exactly 128
conversations, packed into as few 4096-token rows as they need.

Sized for a TPU v5p-128 slice (64 chips of 95 GiB): FSDP over all 64 chips holds the float32
parameters and Adam moments (70.6B x 12 bytes = 790 GiB, 12.3 GiB a chip) plus gradients.
`python -m jsft.cli.plan --config=configs/tulu_70b.py --topology=v5p-128 --examples=939344
--mean_tokens=714` (the TPU compiler's figures): peak 30.1 GiB a chip with the 64 rows 128 Tulu
conversations pack into, 37.3 GiB in the worst case of one row per conversation; roofline 3.9 s a step
(`python -m jsft.cli.tpu`), 14,676 steps. For a smaller slice (v5p-64: 32 chips) run the plan
for it and take the overrides it prints when the step does not fit (more accumulation steps, a
tensor split); on 8x H100 nodes use `--devices=N --device_memory=80GiB` the same way.
"""

from jsft.config import default_config


def get_config():
    c = default_config()
    c.output_dir = "runs/tulu3-70b-sft"
    c.model.path = "meta-llama/Llama-3.1-70B"  # a Hub id (fetched into the HF cache) or a local folder
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    # Keep only each layer's input and recompute the rest (open-instruct used gradient checkpointing
    # too): a 4096-token row saves 4096 x 8192 bf16 values per layer, 5 GiB over 80 layers.
    c.model.remat = "full"
    c.data.mixer = (("allenai/tulu-3-sft-mixture", 1.0),)
    c.data.chat_template = "tulu"
    c.data.max_seq_length = 4096
    c.data.packing = True
    c.train.batch_unit = "examples"
    c.train.global_batch_size = 128  # conversations per step
    c.train.grad_accum_steps = 1
    c.train.epochs = 2
    c.train.seed = 456
    c.train.loss_reduction = "sum"
    c.optim.lr = 2e-6
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
