"""The CPU step profile's pieces (`jsft.cpu_profile`): concurrent ops share each moment of the step, and
ops are classed from a real compiled program's text."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsft import cpu_profile


def test_concurrent_ops_split_each_moment_and_add_up_to_the_busy_time():
    # a alone for 10 ns, a and b together for 10 ns, b alone for 10 ns, idle 10 ns, c alone for 5 ns
    events = [("a", 0, 20), ("b", 10, 30), ("c", 40, 45)]
    shares, busy = cpu_profile.wall_shares(events)
    assert busy == 35
    assert shares == {"a": 15, "b": 15, "c": 5}


def test_ops_of_a_compiled_program_are_classed_with_their_source():
    def program(x, w):
        return jnp.tanh(x @ w).T + 1.0

    text = jax.jit(program).lower(jnp.ones((64, 32)), jnp.ones((32, 48))).compile().as_text()
    ops, computations, stack = cpu_profile.parse_hlo(text)
    classes = {cpu_profile.op_class(name, ops, computations) for name in ops}
    assert "matmul" in classes
    dots = [
        name for name, (opcode, called, _) in ops.items() if "dot" in (opcode, *computations.get(called, []))
    ]
    assert dots and all(cpu_profile.op_class(name, ops, computations) == "matmul" for name in dots)
    frames = [stack(frame) for _, _, frame in ops.values() if frame is not None]
    assert any(any(file.endswith("test_cpu_profile.py") for file, _, _ in f) for f in frames)
