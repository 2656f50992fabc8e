"""python -m jsft.cli.plan on the 8 simulated CPU devices of the tests: its memory is the compiled step's,
its search's pick fits when compiled, and the Tulu config is planned from the shape table alone."""

from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

from jsft import config, data, models
from jsft.cli.plan import parse_args
from jsft.models import shapes
from jsft.planning import costs, hlo, report
from jsft.planning.compiled import Memory, build_trainer, compile_step, compile_with_text
from jsft.planning.roofline import wire_bytes
from jsft.planning.search import REMAT_ORDER, SAVE_MLP_INPUTS, SAVE_PROJECTIONS, Setting, candidates
from jsft.planning.steps import DataPlan, data_plan, step_rows
from jsft.trainer import Trainer
from jsft.units import parse_size

TINY = str(ROOT / "configs" / "tiny.py")
FSDP = ["--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.model.dtype=bfloat16"]


def load(path: str, *overrides: str):
    return config.load(["plan", f"--config={path}", *overrides])


def test_memory_is_the_compiled_train_steps():
    cfg = load(TINY, *FSDP, "--config.model.attention=xla")
    hf_config, _ = shapes.hf_config(cfg.model.path)
    _, memory, _ = compile_step(build_trainer(cfg, hf_config, jax.devices()))
    # The same step built by hand, as train.py builds it, compiled and measured.
    model_cfg = models.ModelConfig.from_hf(
        hf_config, models.dtype_of("bfloat16"), models.dtype_of("float32"), "xla"
    )
    model_cfg = models.ModelConfig(**{**model_cfg.__dict__, "scan_layers": cfg.model.scan_layers})
    trainer = Trainer(
        cfg, models.Layout(model_cfg), build_trainer(cfg, hf_config, jax.devices()).mesh, total_steps=1
    )
    m = trainer.compile_train_step(cfg.train.global_batch_size, cfg.data.max_seq_length).memory_analysis()
    assert (
        memory.peak
        == m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    )
    assert memory.temporaries == m.temp_size_in_bytes
    assert memory.state + memory.batch == m.argument_size_in_bytes
    # five int32 [16, 128] batch arrays split over 8 devices
    assert memory.batch == 5 * 4 * 16 * 128 / 8


def test_search_pick_fits_when_compiled():
    cfg = load(TINY, *FSDP)
    hf_config, _ = shapes.hf_config(cfg.model.path)
    devices = jax.devices()

    smallest = Setting("dots_saveable", 2, 8, 1)
    budget = compile_step(build_trainer(smallest.apply(cfg), hf_config, devices))[1].peak
    lines: list[str] = []
    args, config_argv = parse_args([f"--config={TINY}", *FSDP, f"--device_memory={budget}B"])
    result = report.run(cfg, config_argv, args, log=lines.append)
    pick = result["pick"]
    assert result["memory"].peak > budget  # the config as given does not fit: the search has work to do
    assert pick is not None and result["pick_memory"].peak <= budget
    # The printed overrides give exactly the setting the search compiled and found to fit.
    assert result["verified"].to_dict() == pick.apply(cfg).to_dict()
    assert result["pick_memory"] == result["searched"][pick]
    assert any(line.startswith("pick ") and " ".join(pick.overrides()) in line for line in lines)
    assert any(line.startswith("verified") and "fits" in line for line in lines)
    assert pick.cost <= smallest.cost  # the budget's own setting fits: the pick costs no more
    assert set(REMAT_ORDER) >= {SAVE_PROJECTIONS, SAVE_MLP_INPUTS}  # per-tensor policies are searched


def test_the_search_splits_rows_over_the_context_axis_when_there_are_fewer_rows_than_devices():
    """Two rows of 1024 tokens on 8 devices: rows split over at most 2 (fsdp), the tiny model's 2 key/value
    heads over at most 2 (tensor); context 2 and 4 split the tokens, and context 8 would cut rows into
    64-token chunks, below splash's 128-token blocks."""
    cfg = load(TINY, "--config.train.global_batch_size=2", "--config.data.max_seq_length=1024")
    hf_config, _ = shapes.hf_config(cfg.model.path)
    settings = candidates(cfg, hf_config, devices=8)
    meshes = {(s.fsdp, s.context, s.tensor) for s in settings if s.grad_accum_steps == 1}
    assert (2, 4, 1) in meshes and (2, 2, 2) in meshes and (1, 8, 1) not in meshes
    assert all(s.fsdp * s.context * s.tensor == 8 for s in settings)
    assert all((2 // s.grad_accum_steps) % s.fsdp == 0 for s in settings)
    pick = next(s for s in settings if (s.fsdp, s.context, s.tensor) == (2, 4, 1))
    assert "--config.mesh.context=4" in pick.overrides()
    assert pick.apply(cfg).mesh.context == 4


def test_the_search_splits_experts_only_for_a_mixture_of_experts():
    cfg = load(TINY, "--config.train.global_batch_size=16")
    dense = {"num_attention_heads": 4, "num_key_value_heads": 2}
    assert {s.expert for s in candidates(cfg, dense, devices=8)} == {1}
    settings = candidates(cfg, {**dense, "num_experts": 4}, devices=8)
    assert {s.expert for s in settings} == {1, 2, 4}  # 8 would leave a device without an expert
    assert all(s.fsdp * s.expert * s.context * s.tensor == 8 for s in settings)
    pick = next(s for s in settings if s.expert == 4)
    assert "--config.mesh.expert=4" in pick.overrides() and pick.apply(cfg).mesh.expert == 4


def test_a_batch_that_does_not_split_over_the_devices_is_searched_into_context_splits():
    """2 rows of 1024 tokens with fsdp over all 8 devices cannot split: the plan says so and searches,
    and the pick splits each row's tokens over 4 devices (context)."""
    lines: list[str] = []
    overrides = [*FSDP, "--config.train.global_batch_size=2", "--config.data.max_seq_length=1024"]
    args, config_argv = parse_args([f"--config={TINY}", *overrides, "--device_memory=64GiB"])
    result = report.run(load(TINY, *overrides), config_argv, args, log=lines.append)
    assert any(line.startswith("as given") and "must split evenly" in line for line in lines)
    pick = result["pick"]
    assert (pick.fsdp, pick.context, pick.tensor) == (2, 4, 1)
    assert result["verified"].mesh.context == 4 and result["pick_memory"].peak <= parse_size("64GiB")


def test_tulu_planned_from_the_shape_table_without_weights():
    cfg = load(str(ROOT / "configs" / "tulu.py"))
    hf_config, source = shapes.hf_config(cfg.model.path)
    assert cfg.model.path == "meta-llama/Llama-3.1-8B"
    trainer = build_trainer(cfg, hf_config, jax.devices())  # builds, compiles nothing
    # Llama 3.1 8B's published count
    assert report.parameter_counts(trainer) == (8_030_261_248, 8_030_261_248)
    assert report._count(8_030_261_248) == "8.03B"
    lora = build_trainer(
        load(str(ROOT / "configs" / "tulu.py"), "--config.lora.rank=16"), hf_config, jax.devices()
    )
    total, trained = report.parameter_counts(lora)
    # rank 16 on q, k, v, o, gate, up, down of 32 layers: 16 x (in + out) per kernel
    d, f, kv = 4096, 14336, 1024
    assert (total, trained) == (8_030_261_248, 32 * 16 * ((d + d) * 2 + (d + kv) * 2 + (d + f) * 3))


def test_tulu_70b_planned_from_the_shape_table_without_weights():
    cfg = load(str(ROOT / "configs" / "tulu_70b.py"))
    hf_config, source = shapes.hf_config(cfg.model.path)
    assert "shape table" in source
    trainer = build_trainer(cfg, hf_config, jax.devices())  # builds, compiles nothing
    # Llama 3.1 70B's published count
    assert report.parameter_counts(trainer) == (70_553_706_496, 70_553_706_496)
    assert report._count(70_553_706_496) == "70.55B"


def test_qwen3_moe_planned_from_the_shape_table_with_its_experts_split():
    """The config's mesh is for 32 chips; on the 8 test devices the experts split 8 ways alone."""
    cfg = load(str(ROOT / "configs" / "qwen3_moe.py"), "--config.mesh.fsdp=1")
    hf_config, source = shapes.hf_config(cfg.model.path)
    assert "shape table" in source
    trainer = build_trainer(cfg, hf_config, jax.devices())  # builds, compiles nothing
    assert report.parameter_counts(trainer) == (30_532_122_624, 30_532_122_624)  # Qwen's published count
    experts = trainer.layout.shardings(trainer.mesh)["layers.mlp.gate_proj"]  # [layers, 128, 2048, 768]
    assert experts.shard_shape((48, 128, 2048, 768))[1] == 16


def test_offload_falls_back_to_full_remat_on_cpu(caplog):
    cfg = load(TINY, "--config.model.remat=offload")
    with caplog.at_level(logging.WARNING):
        trainer = build_trainer(cfg, shapes.hf_config(cfg.model.path)[0], jax.devices())
    assert trainer.layout.cfg.remat == "full"
    assert "model.remat=offload: cpu devices cannot offload activations" in caplog.text


def test_batches_of_conversations_compile_the_rows_they_pack_into():
    """With batch_unit=examples the plan compiles the rows a step's conversations take, not one each."""
    cfg = load(TINY, *FSDP, "--config.train.batch_unit=examples", "--config.train.global_batch_size=64")
    hf_config, _ = shapes.hf_config(cfg.model.path)
    trainer = build_trainer(cfg, hf_config, jax.devices())  # 8 devices: rows in multiples of 8
    assert step_rows(trainer)[0] == 64  # nothing known of the data: one row per conversation
    assert data_plan(cfg, examples=1000, mean_tokens=40).steps_per_epoch == 1000 // 64
    estimated = step_rows(trainer, data_plan(cfg, examples=1000, mean_tokens=40))[0]
    assert estimated == 24  # 64 x 40 tokens fill 20 rows of 128: bucketed to 8 x 3
    lengths = np.random.default_rng(0).integers(10, 120, 640)
    examples = [
        dict.fromkeys(("input_ids", "target_ids", "loss_mask"), np.ones(n, np.int32)) for n in lengths
    ]
    packed = data.example_batch_rows(examples, batch_size=64, max_seq_length=128, seed=cfg.train.seed)
    rows, how = step_rows(trainer, DataPlan(10, 10, "", packed))
    batches = data.example_batches(
        examples, batch_size=64, max_seq_length=128, seed=cfg.train.seed, row_multiple=8
    )  # one epoch: 640 conversations in batches of 64
    assert rows == max(batch["segment_ids"].shape[0] for batch, _ in zip(batches, range(10), strict=False))
    assert "largest of one epoch" in how


def test_a_program_the_tpu_compiler_refuses_is_a_plan_that_does_not_fit():
    # libtpu 0.0.52's error for the Tulu step on v5e-64 (16 GiB chips), as compile() raises it.
    message = (
        "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory required "
        "for HLO temporaries (26.34G) exceeds available HBM (15.75G). HLO module: jit_traced.\nSee https://..."
    )
    memory = Memory.refused_by_compiler(message, state_bytes=2 * 2**30, batch_bytes=2**20)
    assert memory.temporaries == 26.34 * 2**30 and memory.peak == memory.temporaries + 2 * 2**30 + 2**20
    assert memory.refused.startswith("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM")


def test_steps_from_examples_and_bad_flags():
    cfg = load(TINY)
    steps = data_plan(cfg, examples=1000, mean_tokens=100)
    assert steps.steps_per_epoch == -(-1000 * 100 // (16 * 128)) and steps.total_steps == cfg.train.max_steps
    assert parse_size("80GiB") == 80 * 2**30 and parse_size("80GB") == 80e9
    for bad in (
        ["--devices=8", "--topology=v5p-8"],
        ["--mfu=1.5"],
        ["--examples=10"],
        ["--device_memory=lots"],
    ):
        with pytest.raises(SystemExit, match="jsft.plan: "):
            parse_args(bad)


def test_the_plan_finds_the_cache_the_encoder_built(tmp_path):
    """Both look the cache up by `cache.key_for` of the data config: the plan counts steps from it."""
    import transformers
    from conftest import TINY_DATA

    cfg = load(
        TINY,
        f"--config.data.mixer=(('{TINY_DATA}/train.jsonl', 200),)",
        f"--config.data.cache_dir={tmp_path}",
        "--config.train.max_steps=0",
    )
    assert data_plan(cfg).steps_per_epoch is None  # nothing built yet
    encoded = data.prepare(cfg.data, transformers.AutoTokenizer.from_pretrained(cfg.model.path), seed=0)
    plan = data_plan(cfg)
    assert plan.note.startswith(f"from the data cache ({len(encoded)} conversations")
    assert plan.steps_per_epoch and plan.total_steps == cfg.train.epochs * plan.steps_per_epoch


def test_matmul_flops_count_every_trip_of_a_loop_and_no_padding():
    """The program reader's matmul FLOPs: a dot in a 7-trip scan, a batched dot_general and a padded,
    strided convolution, against the count by hand. XLA's `cost_analysis()` counts the scan's body once
    (the figure the issue asked to put beside it)."""

    def program(x, w, a, b, image, kernel):
        y, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=7)
        batched = jnp.einsum("bij,bjk->bik", a, b)
        conv = jax.lax.conv_general_dilated(image, kernel, (2, 1), ((2, 2), (1, 1)))
        return y, batched, conv

    args = (
        jnp.ones((64, 128)),
        jnp.ones((128, 128)),
        jnp.ones((3, 8, 16)),
        jnp.ones((3, 16, 4)),
        jnp.ones((2, 3, 16, 16)),
        jnp.ones((5, 3, 3, 3)),
    )
    compiled, text = compile_with_text(jax.jit(program).lower(*args))
    # the convolution's output rows o (stride 2, 2 padded rows each side) meet kernel rows k where
    # 0 <= 2o - 2 + k < 16; columns (stride 1, 1 padded each side) where 0 <= o - 1 + k < 16
    rows = sum(0 <= 2 * o - 2 + k < 16 for o in range(9) for k in range(3))
    cols = sum(0 <= o - 1 + k < 16 for o in range(16) for k in range(3))
    by_hand = 7 * 2 * 64 * 128 * 128 + 2 * 3 * 8 * 16 * 4 + 2 * 2 * 5 * 3 * rows * cols
    assert costs.matmul_flops(hlo.program_facts(text)) == by_hand
    # XLA's count: the body once, plus the tanh and other elementwise work (well under 0.1%)
    assert compiled.cost_analysis()["flops"] == pytest.approx(by_hand - 6 * 2 * 64 * 128 * 128, rel=1e-3)


def test_hbm_bytes_are_xlas_count_per_op_with_every_trip_of_a_loop():
    """The program reader's HBM bytes per op (the roofline's memory-bound time). Without a loop they are
    XLA's own count (`cost_analysis()["bytes accessed"]`) exactly. A 7-layer scan that reads each layer's
    weights out of the stacked ones and writes each layer's output into a stacked result counts each
    trip: near the fully unrolled program's XLA count (the rolled loop also copies each layer's weight
    slices and zero-fills the stacked result), where `cost_analysis()` counts the rolled body once. The
    in-place dynamic-update-slice writes one layer's slice per trip, not the whole stacked result."""

    def layer(x, w):
        h = jnp.tanh(x @ w[0]) * jax.nn.sigmoid(x @ w[1])
        return x + h @ w[2].T, h

    x, stacked = jnp.ones((256, 128)), jnp.full((7, 3, 128, 384), 0.01)

    def counted(fn):
        compiled, text = compile_with_text(jax.jit(fn).lower(x, stacked))
        return compiled.cost_analysis()["bytes accessed"], costs.op_costs(hlo.program_facts(text))

    xla, ops = counted(lambda x, ws: layer(x, ws[0]))
    assert sum(c.hbm_bytes * c.repeats for c in ops) == xla - 2 * 8  # XLA adds the result tuple's pointers
    assert sum(c.flops * c.repeats for c in ops) == 3 * 2 * 256 * 128 * 384

    unrolled, _ = counted(lambda x, ws: jax.lax.scan(layer, x, ws, unroll=7))
    rolled_xla, ops = counted(lambda x, ws: jax.lax.scan(layer, x, ws))
    rolled = sum(c.hbm_bytes * c.repeats for c in ops)
    assert unrolled <= rolled <= 1.15 * unrolled
    assert rolled_xla < unrolled / 4  # the body once
    assert sum(c.flops * c.repeats for c in ops) == 7 * 3 * 2 * 256 * 128 * 384
    (update,) = [c for c in ops if "dynamic-update-slice" in c.instruction.name]
    assert update.repeats == 7 and update.hbm_bytes < 2.1 * 256 * 384 * 4  # read h, write its slice


WINDOWED_MATMUL = """
%window (params) -> bf16[2,64,32] {
  %param_1.1 = bf16[2,64,512]{2,1,0} parameter(1)
  %constant.1 = bf16[] constant(-inf)
  %pad.1 = bf16[2,64,544]{2,1,0} pad(%param_1.1, %constant.1), padding=0_0x0_0x0_32
  %param_0.1 = u32[] parameter(0)
  %zero.1 = u32[] constant(0)
  ROOT %dynamic-slice.1 = bf16[2,64,32]{2,1,0} dynamic-slice(%pad.1, %zero.1, %zero.1, %param_0.1)
}

%matmul (params) -> bf16[2,64,128] {
  %param_2.2 = u32[] parameter(2)
  %param_0.2 = bf16[2,64,512]{2,1,0} parameter(0)
  %fusion.1 = bf16[2,64,32]{2,1,0} fusion(%param_2.2, %param_0.2), kind=kLoop, calls=%window
  %param_1.2 = bf16[32,128]{1,0:S(1)} parameter(1)
  %dot.1 = bf16[2,64,128]{2,1,0} dot(%fusion.1, %param_1.2), lhs_contracting_dims={2},
    rhs_contracting_dims={0}
  %param_3.2 = bf16[2,64,128]{2,1,0} parameter(3)
  ROOT %add.1 = bf16[2,64,128]{2,1,0} add(%dot.1, %param_3.2)
}

ENTRY %main (params) -> bf16[2,64,128] {
  %p0 = bf16[2,64,512]{2,1,0} parameter(0)
  %p1 = bf16[32,128]{1,0:S(1)} parameter(1)
  %p2 = u32[] parameter(2)
  %p3 = bf16[2,64,128]{2,1,0} parameter(3)
  ROOT %fusion.2 = bf16[2,64,128]{2,1,0} fusion(%p0, %p1, %p2, %p3), kind=kOutput, calls=%matmul
}
"""


def test_a_windowed_matmul_reads_its_window_of_the_activation():
    """A collective-matmul window as the TPU compiler writes it: a nested fusion pads the activation and
    slices the window out of it for the matmul, whose partial sum adds into the whole product. HBM
    bytes: the window (not the whole activation), nothing of the weight chunk (in VMEM, S(1)), the
    partial sum read and the product written; FLOPs: the window's matmul."""
    (op,) = costs.op_costs(hlo.program_facts(WINDOWED_MATMUL))
    window, product, u32 = 2 * 64 * 32 * 2, 2 * 64 * 128 * 2, 4
    assert op.hbm_bytes == window + u32 + product + product
    assert op.flops == 2 * (2 * 64 * 128) * 32


def test_async_pairs_with_nothing_inside_block_like_synchronous_collectives():
    """The roofline's wire bytes: a collective-permute pair with compute scheduled inside overlaps it;
    one with nothing inside waits for its transfer as a synchronous collective does."""
    start = hlo.Instruction("%cp", "collective-permute-start", "bf16[1024]", "", "%main", "")
    reduce = hlo.Instruction("%ar", "all-reduce", "f32[256]", "", "%main", "")
    facts = hlo.ProgramFacts(
        [start, reduce],
        [
            hlo.AsyncPair("collective-permute", start, 3, 2048, 2),
            hlo.AsyncPair("collective-permute", start, 0, 2048, 1),
        ],
        [(reduce, 1)],
        {},
        {},
        {},
    )
    # 8 devices: the all-reduce moves 2 x 7/8 of its 1 KiB, a permute all of its 2 KiB
    assert wire_bytes(facts, 8) == (2 * 2048, 2 * 7 / 8 * 1024 + 2048)


def test_loop_trip_counts_are_read_for_unsigned_counters_starting_above_zero():
    """The TPU's collective-matmul loops count in u32 from 2 by 2 below 16, without XLA's trip-count
    annotation: reading only s32 bounds counted such a loop once, the largest constant 16 times; the plan
    reported 7.7 GiB of async traffic for configs/tulu.py on v5p-64 where there are 40.2. A psum inside a
    u32 loop from 2 to 9 by 1 runs 7 times, and one from 2 below 16 by 2 runs 7 times: by XLA's
    annotation where it gave one, and without it from the counter's start, step and bound."""
    mesh = jax.make_mesh((8,), ("d",))

    def by_one(x):
        def step(i, carry):
            return carry + jax.lax.psum(jnp.sin(carry) * i.astype(jnp.float32), "d")

        return jax.lax.fori_loop(jnp.uint32(2), jnp.uint32(9), step, x)

    def by_two(x):
        def step(state):
            i, carry = state
            return i + jnp.uint32(2), carry + jax.lax.psum(jnp.sin(carry) * i.astype(jnp.float32), "d")

        return jax.lax.while_loop(lambda state: state[0] < jnp.uint32(16), step, (jnp.uint32(2), x))[1]

    x = jax.device_put(jnp.ones(64, jnp.float32), jax.NamedSharding(mesh, jax.P("d")))
    for body in (by_one, by_two):
        program = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=jax.P("d"), out_specs=jax.P("d")))
        text = program.lower(x).compile().as_text()
        unannotated = re.sub(r'"known_(trip_count|init_step)":\{[^}]*\},?', "", text)
        assert "known_trip_count" not in unannotated
        for program_text in (text, unannotated):
            facts = hlo.program_facts(program_text)
            assert [(i.opcode, repeats) for i, repeats in facts.sync_collectives] == [("all-reduce", 7)]
            assert facts.collective_bytes() == {"all-reduce": 7 * 8 * 4}
