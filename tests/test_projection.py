"""The projection's CPU gradient (`projection._project_cpu`): the einsum's value and gradients, for every
kernel shape a projection has, and taken only where the traced program's mesh is on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsft import sharding
from jsft.models import projection


@pytest.mark.parametrize(
    "shape, inputs",
    [((16, 4, 8), 1), ((4, 8, 16), 2), ((16, 48), 1), ((48, 16), 1)],
    ids=["q_proj", "o_proj", "up_proj", "down_proj"],
)
def test_cpu_gradient_equals_the_einsum_gradient(shape, inputs):
    letters = "abc"[: len(shape)]
    contraction = f"...{letters[:inputs]},{letters}->...{letters[inputs:]}"  # as `Projection` writes it
    x = jax.random.normal(jax.random.key(1), (2, 5, *shape[:inputs]))
    kernel = jax.random.normal(jax.random.key(0), shape)
    weights = jax.random.normal(jax.random.key(2), (2, 5, *shape[inputs:]))

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(fn(contraction, x, k) * weights), (0, 1)))

    value, grads = loss(projection._project_cpu)(x, kernel)
    value_ref, grads_ref = loss(jnp.einsum)(x, kernel)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    for got, want in zip(grads, grads_ref, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cpu_gradient_only_under_a_cpu_mesh():
    assert sharding.traced_platform() is None  # no mesh: the plain einsum
    with jax.sharding.use_abstract_mesh(sharding.single_device_mesh().abstract_mesh):
        assert sharding.traced_platform() == jax.devices()[0].platform
