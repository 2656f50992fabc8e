"""Tulu 3 SFT on a mixture of experts: Qwen3-30B-A3B-Base (128 experts, 8 per token, 3.35B of 30.5B
parameters active) with the Tulu 3 8B recipe of `configs/tulu.py`.

    python -m jsft.train --config=configs/qwen3_moe.py

Only the model and the mesh differ from `configs/tulu.py` (lr 5e-6, linear schedule with 3% warmup,
2 epochs, 128 conversations of up to 4096 tokens per step, sum reduction); the routers'
load-balancing loss is added with the model's own `router_aux_loss_coef` (0.001), as transformers
does. The Tulu recipe was published for dense models: treat the lr as a starting point.

Sized for a TPU v5p-64 slice (32 chips of 95 GiB): each layer's experts are split over 8 chips
(`mesh.expert`, 16 experts a chip, never gathered), and those 8 x 4 chips split the batch's rows and
the remaining weights (fsdp). The TPU compiler's plan (`python -m jsft.cli.tpu --topology=v5p-64
--config=configs/qwen3_moe.py`): peak 53.7 GiB a chip, roofline 1.19 s a step for 128 rows, against
1.39 s with fsdp over all 32 chips and no expert split (the experts then gathered every layer). On
another slice keep `mesh.expert` a divisor of 128 and of the chips, and let `jsft.cli.plan` search.
"""

from jsft.config import default_config


def get_config():
    c = default_config()
    c.output_dir = "runs/qwen3-30b-a3b-tulu3-sft"
    c.model.path = "Qwen/Qwen3-30B-A3B-Base"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
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
    c.optim.clip_grad_norm = 0.0
    c.mesh.data = 1
    c.mesh.fsdp = 4
    c.mesh.expert = 8
    c.mesh.tensor = 1
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 3
    c.log.every_steps = 10
    return c
