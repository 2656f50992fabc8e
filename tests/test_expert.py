"""Expert parallelism: a mixture of experts' experts split over the mesh's expert axis give one device's
numbers.

Each device of the expert axis holds `experts / ep` of every layer's experts and its share of the rows;
tokens are gathered over the axis, each device runs its experts' assignments, and the outputs come back
summed (`jsft.models.moe._routed`). The loss (token losses plus the routers' load-balancing loss) and the
whole gradient tree on 8 CPU devices with expert = 2, 4, 8 (alone and with fsdp and tensor) are compared
with one device's; the floor is the one-device gradient of the same batch with its rows reversed.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_moe import make_hf_moe

from jsft import models, sharding, step

ROWS, SEQ = 8, 32


def _batch(vocab: int) -> dict[str, np.ndarray]:
    """Packed rows of two segments, padding at the end, about half the tokens trained."""
    rng = np.random.default_rng(0)
    segments = np.repeat(np.array([[1] * 18 + [2] * 10 + [0] * 4]), ROWS, 0).astype(np.int32)
    positions = np.repeat(np.array([list(range(18)) + list(range(10)) + [0] * 4]), ROWS, 0).astype(np.int32)
    return {
        "input_ids": rng.integers(3, vocab, (ROWS, SEQ)).astype(np.int32),
        "target_ids": rng.integers(3, vocab, (ROWS, SEQ)).astype(np.int32),
        "loss_mask": ((rng.random((ROWS, SEQ)) < 0.5) & (segments > 0)).astype(np.int32),
        "segment_ids": segments,
        "positions": positions,
    }


def _loss_and_grads(folder, batch, mesh_shape: dict) -> tuple[float, dict, dict]:
    """(token losses + load-balancing loss, its gradient, the parameters' shardings) on `mesh_shape`."""
    devices = jax.devices()[: int(np.prod(list(mesh_shape.values())))]
    mesh = sharding.make_mesh(mesh_shape, devices)
    model_cfg, _ = models.config_from_folder(str(folder))
    layout = models.Layout(model_cfg)
    params = models.load_params(str(folder), layout, mesh)

    def total(p, b):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            token_sum, router = step._loss_terms(layout, p, b)
            # the router losses weigh like the tokens, so their gradients show
            return token_sum + 50.0 * router.aux + 5.0 * router.z

    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    run = jax.jit(jax.value_and_grad(total))
    # The experts' outputs go back to their tokens' devices summed over the expert axis (psum_scatter).
    assert ("reduce_scatter" in run.lower(params, batch).as_text()) == (mesh.shape["expert"] > 1)
    value, grads = run(params, batch)
    return float(value), jax.device_get(grads), {k: v.sharding for k, v in params.items()}


def _relative(a: dict, b: dict) -> dict[str, float]:
    return {k: float(np.linalg.norm(a[k] - b[k]) / np.linalg.norm(b[k])) for k in b}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_moe")
    make_hf_moe(folder, "qwen3_moe")  # 8 experts, top 2
    model_cfg, _ = models.config_from_folder(str(folder))
    batch = _batch(model_cfg.vocab_size)
    value, grads, _ = _loss_and_grads(folder, batch, {"data": 1})
    reversed_rows = {k: v[::-1].copy() for k, v in batch.items()}
    _, reordered, _ = _loss_and_grads(folder, reversed_rows, {"data": 1})
    return folder, batch, value, grads, max(_relative(reordered, grads).values())


@pytest.mark.parametrize(
    "mesh_shape",
    [
        {"expert": 2},
        {"expert": 4},
        {"expert": 8},
        {"fsdp": 2, "expert": 2, "tensor": 2},
        {"fsdp": 2, "expert": 4},
    ],
    ids=["ep2", "ep4", "ep8", "fsdp2_ep2_tensor2", "fsdp2_ep4"],
)
def test_expert_parallel_loss_and_gradients_equal_one_device(reference, mesh_shape):
    folder, batch, value, grads, floor = reference
    got_value, got_grads, shardings = _loss_and_grads(folder, batch, mesh_shape)
    experts = shardings["layers.0.mlp.gate_proj"]  # [experts, embed, width]: split over the expert axis
    assert experts.spec[0] == "expert" and experts.shard_shape((8, 48, 24))[0] == 8 // mesh_shape["expert"]
    differences = _relative(got_grads, grads)
    worst = max(differences, key=differences.get)
    print(f"{mesh_shape}: floor {floor:.1e}, worst {differences[worst]:.1e} ({worst})")
    assert 0 < floor < 1e-5
    assert got_value == pytest.approx(value, rel=1e-5)
    for name, difference in differences.items():
        assert difference <= 10 * floor, (name, difference, floor)
