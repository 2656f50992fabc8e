"""jsft's libtpu flags per TPU slice (`jsft.runtime`): which set a slice or TPU VM gets, and that the
user's LIBTPU_INIT_ARGS and JSFT_LIBTPU_DEFAULTS=0 still win. No libtpu needed: its version is stubbed."""

from __future__ import annotations

import os

import pytest

from jsft import hardware, runtime


@pytest.mark.parametrize(
    "name, generation",
    [
        ("v5e-64", "v5e"),
        ("v5litepod-64", "v5e"),
        ("V5LITEPOD-8", "v5e"),
        ("v5p-128", "v5p"),
        ("v6e-8", "v6e"),
        ("v4-32", "v4"),
        ("", None),
        ("cpu", None),
        ("NVIDIA H100 80GB HBM3", None),
    ],
)
def test_tpu_generation_of_slice_and_accelerator_type_names(name, generation):
    assert hardware.tpu_generation(name) == generation


@pytest.mark.parametrize(
    "name, size", [("v5e-64", 64), ("v5litepod-256", 256), ("v5p-8", 8), ("v5e", None), ("", None)]
)
def test_slice_size_is_the_count_its_name_ends_in(name, size):
    assert hardware.slice_size(name) == size


V5E_FLAGS = runtime.LIBTPU_SLICE_FLAGS["v5e"][1]


def test_large_v5e_slices_get_continuation_fusion_instead_of_collective_matmul():
    for name in ("v5e-32", "v5e-64", "v5litepod-64", "v5e-256"):
        flags = runtime.libtpu_default_flags(name)
        assert flags == V5E_FLAGS, name
    assert set(runtime.CONTINUATION_FUSION_FLAGS) <= set(V5E_FLAGS)
    assert not set(runtime.COLLECTIVE_MATMUL_FLAGS) & set(V5E_FLAGS)  # they would take precedence
    assert set(runtime.SCHEDULER_FLAGS) <= set(V5E_FLAGS)


def test_other_slices_keep_collective_matmul_and_no_v5e_only_flag():
    # small v5e slices: collective matmul's permute loops are async there; libtpu 0.0.52 refuses the
    # continuation-fusion flags on v5p and v6e
    for name in ("v5e-8", "v5litepod-16", "v5e", "v5p-8", "v5p-256", "v6e-64", "v4-8", "", None, "cpu"):
        assert runtime.libtpu_default_flags(name) == runtime.LIBTPU_DEFAULT_FLAGS, name
    assert not set(runtime.CONTINUATION_FUSION_FLAGS) & set(runtime.LIBTPU_DEFAULT_FLAGS)


def test_users_flags_win_on_v5e():
    user = "--xla_tpu_enable_async_collective_fusion_multiple_steps=false --noxla_enable_async_all_gather"
    args = runtime.libtpu_init_args(user, "v5litepod-64").split()
    assert args[:2] == user.split()
    assert "--xla_tpu_enable_async_collective_fusion_multiple_steps=true" not in args
    assert "--xla_enable_async_all_gather=true" not in args
    assert "--xla_tpu_enable_async_collective_fusion=true" in args


@pytest.fixture
def libtpu_version(monkeypatch):
    def set_version(version):
        monkeypatch.setattr(runtime, "_libtpu_version", lambda: version)

    set_version(runtime.LIBTPU_FLAGS_CHECKED_WITH)
    return set_version


def test_set_libtpu_defaults_reads_the_tpu_vms_accelerator_type(libtpu_version):
    environ = {"TPU_ACCELERATOR_TYPE": "v5litepod-64"}
    runtime.set_libtpu_defaults(environ)
    assert environ["LIBTPU_INIT_ARGS"].split() == list(V5E_FLAGS)
    environ = {"TPU_ACCELERATOR_TYPE": "v5p-64", "LIBTPU_INIT_ARGS": "--xla_foo=1"}
    runtime.set_libtpu_defaults(environ)
    assert environ["LIBTPU_INIT_ARGS"].split() == ["--xla_foo=1", *runtime.LIBTPU_DEFAULT_FLAGS]
    # a compile for a named slice: its generation, whatever machine this is
    environ = {"TPU_ACCELERATOR_TYPE": "v5p-64"}
    runtime.set_libtpu_defaults(environ, accelerator="v5e-64")
    assert environ["LIBTPU_INIT_ARGS"].split() == list(V5E_FLAGS)


def test_set_libtpu_defaults_off_or_without_a_checked_libtpu(libtpu_version):
    environ = {"JSFT_LIBTPU_DEFAULTS": "0", "TPU_ACCELERATOR_TYPE": "v5litepod-64"}
    runtime.set_libtpu_defaults(environ)
    assert "LIBTPU_INIT_ARGS" not in environ
    for version in (None, (0, 0, 51)):
        libtpu_version(version)
        environ = {"TPU_ACCELERATOR_TYPE": "v5litepod-64"}
        runtime.set_libtpu_defaults(environ)
        assert "LIBTPU_INIT_ARGS" not in environ


def test_prepare_tpu_compile_takes_the_slices_generation(libtpu_version, monkeypatch, capsys):
    for key in ("LIBTPU_INIT_ARGS", "JSFT_LIBTPU_DEFAULTS", "TPU_ACCELERATOR_TYPE"):
        monkeypatch.setenv(key, "")  # recorded as it was, so the flags set below do not outlive the test
        monkeypatch.delenv(key)
    for key in ("JAX_PLATFORMS", "ALLOW_MULTIPLE_LIBTPU_LOAD", "TPU_SKIP_MDS_QUERY"):
        monkeypatch.setenv(key, os.environ.get(key, "1"))  # prepare_tpu_compile sets them: restored after
    monkeypatch.setattr(runtime.jax.config, "update", lambda *a: None)  # JAX's platform stays as it is
    expected = {
        ("v5e-64", "v5e-256"): V5E_FLAGS,
        ("v5p-8", "v5e-8"): runtime.LIBTPU_DEFAULT_FLAGS,
        ("v5e-64", "v5p-64"): runtime.LIBTPU_DEFAULT_FLAGS,  # one process, one set of flags
        (): runtime.LIBTPU_DEFAULT_FLAGS,
    }
    for topologies, flags in expected.items():
        monkeypatch.delenv("LIBTPU_INIT_ARGS", raising=False)
        runtime.prepare_tpu_compile(list(topologies))
        assert os.environ["LIBTPU_INIT_ARGS"].split() == list(flags), topologies
    assert "not the flags of v5e-64: compile those in a run of their own" in capsys.readouterr().err
