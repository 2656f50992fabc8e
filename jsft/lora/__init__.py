"""LoRA and QLoRA: trainable low-rank factors beside frozen projection kernels, applied unmerged.

For a target kernel W (its input axes, then its output axes) the model holds A [in..., r] and
B [r, out...] as parameters of the projection itself (`models.projection.Projection`, named
`<kernel>.lora_a` and `<kernel>.lora_b`), and computes `y = x W + scale * (dropout(x) A) B` where the
projection runs, inside the layer scan. No merged or full-size copy of W, and no gradient for it, ever
exists: the backward through W computes only the input's gradient. B starts at zero, so training starts
exactly from the base model. `scale` is alpha / r, or alpha / sqrt(r) with rsLoRA.

The optimizer sees only the trainable partition (`Layout.trainable`, decided by `LoraSpec.trainable`: the
factors, plus any base weights named by `lora.also_train`); the frozen rest is `TrainState.base`, read
from the model folder, never checkpointed, held in the compute dtype (`lora.base_dtype`) or quantized
block-wise (`Quantized`: int8, or NF4 with two codes per byte) and dequantized one layer at a time inside
the scan (QLoRA).

- `spec`: `LoraSpec`, the settings as plain data (the model reads it; imports nothing above `config`);
- `quant`: `Quantized` and `quantize` (the model dequantizes; imports nothing of jsft);
- `params`: fresh factors and the frozen base (cast or quantized) with its shapes and shardings;
- `peft`: adapters out as PEFT folders (`jsft.export.write_adapter`) and in (`lora.init_from`).
"""
