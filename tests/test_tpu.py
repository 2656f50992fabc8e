"""The tiny model's train step compiled by the real TPU compiler (libtpu) for a v5p-8 slice, on this CPU.

The compile runs in a subprocess (`python -m jsft.cli.tpu`): TPU topologies need a process whose JAX
backend is CPU with libtpu loaded before JAX starts, which the 8 simulated devices of the tests are not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from jsft import flops, models, runtime
from jsft.planning import hlo

pytest.importorskip("libtpu")

TINY_ON_V5P_8 = [
    "--topology=v5p-8",
    f"--config={ROOT / 'configs' / 'tiny.py'}",
    "--config.model.attention=splash",
    "--config.mesh.data=1",
    "--config.mesh.fsdp=-1",
]


def _compiled_report(*overrides: str) -> dict:
    # compiled with the libtpu flags jsft sets by default, whatever this shell sets
    drop = ("XLA_FLAGS", "LIBTPU_INIT_ARGS", "JSFT_LIBTPU_DEFAULTS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    done = subprocess.run(
        [sys.executable, "-m", "jsft.cli.tpu", *TINY_ON_V5P_8, *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report() -> dict:
    return _compiled_report()


def test_compiled_for_the_slice_with_the_tpu_compilers_memory(report):
    assert report["devices"] == 4 and report["mesh"] == {
        "data": 1,
        "fsdp": 4,
        "expert": 1,
        "context": 1,
        "tensor": 1,
    }
    memory = report["memory_gib"]
    # float32 parameters and two Adam moments of 0.84M parameters, split 4 ways: ~2.5 MiB before padding
    assert 2.4 / 1024 < memory["state"] < 8 / 1024
    assert memory["peak"] >= memory["state"] + memory["temporaries"]


def test_offload_keeps_every_layer_input_in_host_memory(report):
    """remat=offload: the TPU compiler places each layer's input in host memory, exactly 4 layers x 4
    rows x 128 tokens x 128 bfloat16 values per chip; without it nothing is offloaded."""
    offload = _compiled_report("--config.model.remat=offload")
    assert offload["memory_gib"]["host"] * 2**30 == 4 * 4 * 128 * 128 * 2
    assert report["memory_gib"]["host"] == 0


def test_splash_kernel_is_the_attention(report):
    assert all(report["splash_kernels"][part] >= 1 for part in ("fwd", "dq", "dkv")), report["splash_kernels"]
    assert report["problems"]["attention not by splash"] == []


def test_no_unexpected_all_to_all_or_whole_stacked_parameter_gather(report):
    assert report["problems"]["unexpected all-to-all"] == []
    assert report["problems"]["whole stacked parameters gathered"] == []


def test_every_async_collective_has_compute_inside(report):
    assert report["problems"]["async pairs without compute between"] == []


def test_compiled_with_jsfts_libtpu_flags(report):
    assert report["libtpu_init_args"].split() == list(runtime.LIBTPU_DEFAULT_FLAGS)


def test_layer_fsdp_collectives_are_async_with_compute_between(report):
    """Every layer's parameter all-gathers and gradient reductions are async collective-permute loops
    (collective matmul) with compute scheduled inside each pair."""
    assert report["problems"]["synchronous FSDP collectives in the layers"] == []
    pairs = report["async_pairs"]
    assert pairs.get("collective-permute", 0) >= 4 * 7  # at least one per layer parameter
    assert pairs["collective-permute overlapped"] == pairs["collective-permute"]
    # what stays synchronous among parameter-shaped collectives: the norm scales' gradient all-reduces
    # (replicated parameters: data-parallel sums, not FSDP traffic)
    assert all(line.startswith("all-reduce bf16[128]") for line in report["replicated_all_reduces"])


@pytest.mark.xfail(
    strict=True,
    reason="libtpu 0.0.52 makes no plain all-gather or all-reduce async on v5p (continuation fusion is "
    "refused there: 'not supported on platforms other than TPU v5e'); only einsums decomposed by "
    "collective matmul become async pairs. The LM head is put together by collective-permutes inside "
    "the chunked loss's shard_map (async), but the tiny embedding is gathered for the lookup and its "
    "scatter-add gradient all-reduced: once per step each, synchronously",
)
def test_fsdp_collectives_outside_the_layers_are_async(report):
    assert report["problems"]["synchronous FSDP collectives outside the layers"] == []


def test_roofline_mfu_is_the_training_logs_definition(report):
    roofline = report["roofline"]
    assert roofline["mfu"] == pytest.approx(roofline["compute_s"] / roofline["step_s"])
    assert 0 < roofline["mfu"] <= 1
    assert report["mfu_definition"] == flops.MFU_DEFINITION


def test_roofline_counts_the_attention_kernels_and_the_hbm_bound_ops(report):
    """The splash kernels' FLOPs, read from their q and k shapes: the forward's 2 matmuls, dq's 3 and
    dkv's 4 against the 2 + 4 of the MFU count, so 1.5 x the model's causal attention FLOPs. The tiny
    model's program waits on HBM more than on its matmuls, so its ops take longer than all its bytes at
    the HBM bandwidth and most of that is HBM-bound time."""
    cfg, _ = models.config_from_folder(ROOT / "tools" / "tiny" / "model")
    tokens = 16 * 128 / report["devices"]
    attention = flops.mfu_flops_per_token(cfg, 128) - flops.flops_per_token(cfg, seq_len=0)
    counted = report["program_flops_per_device"]
    assert counted["attention_kernels"] == pytest.approx(1.5 * attention * tokens, rel=1e-9)
    roofline = report["roofline"]
    assert roofline["ops_s"] >= roofline["hbm_s"] > 0
    assert roofline["hbm_bound_s"] > 0.5 * roofline["ops_s"]
    assert roofline["step_s"] >= roofline["ops_s"]


def test_program_matmul_flops_are_six_per_weight_and_token(report):
    """The program reader's loop-aware count of the TPU program's matmuls (written as convolutions)
    equals 6 x the matmul weights a token meets x the device's tokens: forward, and the two gradient
    matmuls, of every scanned layer and the LM head (no remat here; splash attention is a kernel, not
    counted). XLA's `cost_analysis()` counts the layer scan's body once."""
    cfg, _ = models.config_from_folder(ROOT / "tools" / "tiny" / "model")
    tokens = 16 * 128 / report["devices"]  # configs/tiny.py: 16 rows of 128 tokens
    counted = report["program_flops_per_device"]
    assert counted["matmuls"] == flops.flops_per_token(cfg, seq_len=0) * tokens
    assert counted["cost_analysis"] < counted["matmuls"] / 2


def test_libtpu_defaults_keep_the_users_flags():
    user = "--xla_tpu_all_gather_collective_matmul_mode=post_spmd_conservative --xla_foo=1 TPU_MEGACORE=X"
    args = runtime.libtpu_init_args(user).split()
    assert args[:3] == user.split()
    assert "--xla_tpu_all_gather_collective_matmul_mode=post_spmd" not in args
    assert set(runtime.LIBTPU_DEFAULT_FLAGS[1:]) <= set(args)
    no = runtime.libtpu_init_args("--noxla_tpu_enable_all_experimental_scheduler_features").split()
    assert "--xla_tpu_enable_all_experimental_scheduler_features=true" not in no
    environ = {"JSFT_LIBTPU_DEFAULTS": "0"}
    runtime.set_libtpu_defaults(environ)
    assert "LIBTPU_INIT_ARGS" not in environ
    environ = {}
    runtime.set_libtpu_defaults(environ)
    assert environ["LIBTPU_INIT_ARGS"].split() == list(runtime.LIBTPU_DEFAULT_FLAGS)


# A TPU v5e continuation fusion, cut down from the compiler's dump: the all-gather is started by one
# fusion, carried through a compute fusion and finished by another.
CONTINUATION = """
%start_body (p0: bf16[16]) -> (bf16[16], bf16[64], u32[]) {
  %p0 = bf16[16]{0} parameter(0)
  %all-gather.1 = bf16[64]{0} all-gather(%p0), channel_id=73, dimensions={0}
  ROOT %cc = (bf16[16], bf16[64], u32[]) custom-call(%all-gather.1), custom_call_target="AsyncCollectiveStart"
}

%async_collective_fusion.7 (q0: bf16[16], q1: bf16[64], q2: f32[8]) -> (bf16[64], f32[8]) {
  %q0 = bf16[16]{0} parameter(0)
  %q1 = bf16[64]{0} parameter(1)
  %q2 = f32[8]{0} parameter(2)
  %m = f32[8]{0} multiply(%q2, %q2)
  %all-gather.2 = bf16[64]{0} all-gather(%q0), channel_id=73, dimensions={0}
  ROOT %t = (bf16[64]{0}, f32[8]{0}) tuple(%all-gather.2, %m)
}

%done_body (r0: bf16[64]) -> bf16[64] {
  %r0 = bf16[64]{0} parameter(0)
  ROOT %cc.2 = bf16[64]{0} custom-call(%r0), custom_call_target="AsyncCollectiveDone"
}

ENTRY %main (a: bf16[16], b: f32[8]) -> bf16[64] {
  %a = bf16[16]{0} parameter(0)
  %b = f32[8]{0} parameter(1)
  %async-collective-start.1 = (bf16[16]{0}, bf16[64]{0}, u32[]) fusion(%a), kind=kCustom, calls=%start_body
  %g0 = bf16[16]{0} get-tuple-element(%async-collective-start.1), index=0
  %g1 = bf16[64]{0} get-tuple-element(%async-collective-start.1), index=1
  %fusion.9 = (bf16[64]{0}, f32[8]{0}) fusion(%g0, %g1, %b), kind=kOutput, calls=%async_collective_fusion.7
  %g2 = bf16[64]{0} get-tuple-element(%fusion.9), index=0
  ROOT %async-collective-done.1 = bf16[64]{0} fusion(%g2), kind=kCustom, calls=%done_body
}
"""


def test_continuation_fusion_is_an_async_all_gather():
    facts = hlo.program_facts(CONTINUATION)
    assert facts.sync_collectives == []
    [pair] = facts.async_pairs
    assert (pair.collective, pair.compute_between, pair.bytes) == ("all-gather", 1, 64 * 2)


@pytest.fixture(scope="module")
def v5e_report(tmp_path_factory) -> dict:
    """One Llama layer 1024 wide (8 MiB matrices: the tiny model's are gathered by all-reduces, too small
    for continuation fusion) compiled for a v5e-8 slice, FSDP over its 8 chips, with jsft's flags for
    v5e slices of 32 chips and more (v5e-8 gets collective matmul; these compile in seconds there)."""
    from jsft.models import shapes

    folder = tmp_path_factory.mktemp("llama_1024")
    shape = {**shapes.LLAMA_32_1B, "num_hidden_layers": 1, "vocab_size": 2048, "hidden_size": 1024}
    shape |= {"intermediate_size": 4096, "num_attention_heads": 16, "num_key_value_heads": 4}
    (folder / "config.json").write_text(json.dumps({**shape, "tie_word_embeddings": False}))
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TPU_ACCELERATOR_TYPE")}
    env |= {"LIBTPU_INIT_ARGS": " ".join(V5E_FLAGS), "JSFT_LIBTPU_DEFAULTS": "0"}
    args = [
        "--topology=v5e-8",
        f"--config={ROOT / 'configs' / 'tiny.py'}",
        f"--config.model.path={folder}",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=-1",
        "--config.data.max_seq_length=256",
        "--config.train.global_batch_size=8",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "jsft.cli.tpu", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


V5E_FLAGS = runtime.libtpu_default_flags("v5e-64")


def test_v5e_fsdp_all_gathers_are_continuation_fusions(v5e_report):
    """jsft's flags for large v5e slices (continuation fusion instead of collective matmul) make the
    layer's parameter all-gathers async pairs (start fusion, compute fusions, done fusion), each with
    compute inside; with collective matmul's flags none of them is an all-gather pair."""
    assert v5e_report["libtpu_init_args"].split() == list(V5E_FLAGS)
    pairs = v5e_report["async_pairs"]
    assert pairs.get("all-gather", 0) >= 4
    assert pairs["all-gather overlapped"] == pairs["all-gather"]
    assert v5e_report["problems"]["async pairs without compute between"] == []


@pytest.mark.xfail(
    strict=True,
    reason="libtpu 0.0.52 on v5e with continuation fusion: the attention projections' all-gathers and "
    "the gradient reductions (all-reduces, not reduce-scatters) stay synchronous",
)
def test_v5e_layer_fsdp_collectives_are_all_async(v5e_report):
    assert v5e_report["problems"]["synchronous FSDP collectives in the layers"] == []
