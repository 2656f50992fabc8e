"""Long-context SFT: Llama 3.1 8B on rows of 32,768 tokens, with the Tulu 3 8B optimizer settings.

    python -m jsft.train --config=configs/tulu_32k.py --config.data.mixer="(('long.jsonl', 1.0),)"

Llama 3.1 is pretrained to 128k positions (its `llama3` RoPE scaling), so 32k rows need no RoPE
change. The mixer is the Tulu 3 SFT mixture so the config runs as shipped; replace it with the long
conversations (reasoning traces, agent transcripts) the run is for. Conversations longer than a row
are truncated to it and counted, as with any `max_seq_length`.

`train.batch_unit = "rows"`: a step is 32 full rows (1M token positions). Counting a step in
conversations (`examples`, as `configs/tulu.py`) would not fit long rows: 128 Tulu-length
conversations (about 700 tokens each) fill 3 rows of 32k, and the row count is rounded up to a
multiple of the batch-sharded devices, so a 32-chip step would be 90% padding. With rows every step
holds the same number of tokens, so `loss_reduction = "mean"` (sum would only rescale each step's
gradient by a near-constant count, which AdamW ignores).

Sized for a TPU v5p-64 slice (32 chips of 95 GiB): FSDP over the 32 chips, one row per chip, full
remat (each layer keeps only its 32k x 4096 bfloat16 input, 256 MiB; `minimal` would keep 43k values
per token per layer, 90 GiB a row). The TPU compiler's plan (`python -m jsft.cli.plan
--config=configs/tulu_32k.py --topology=v5p-64`): peak 22.5 GiB a chip, roofline 5.1 s a step. With
fewer rows than chips, split each row's tokens over `mesh.context` devices: 16 rows on the same slice
with `--config.train.global_batch_size=16 --config.mesh.fsdp=16 --config.mesh.context=2` peak at 14.6
GiB a chip and take 2.6 s (README, "Long context"). On another slice, plan it the same way: the search
picks the context split when the rows do not divide over the chips.
"""

from jsft.config import default_config


def get_config():
    c = default_config()
    c.output_dir = "runs/llama31-8b-32k-sft"
    c.model.path = "meta-llama/Llama-3.1-8B"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "full"
    c.data.mixer = (("allenai/tulu-3-sft-mixture", 1.0),)
    c.data.chat_template = "tulu"
    c.data.max_seq_length = 32768
    c.data.packing = True
    c.train.batch_unit = "rows"
    c.train.global_batch_size = 32  # rows of 32,768 tokens per step
    c.train.grad_accum_steps = 1
    c.train.epochs = 2
    c.train.seed = 8
    c.train.loss_reduction = "mean"
    c.optim.lr = 5e-6
    c.optim.schedule = "linear"
    c.optim.warmup_ratio = 0.03
    c.optim.weight_decay = 0.0
    c.optim.clip_grad_norm = 0.0
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 3
    c.log.every_steps = 10
    return c
