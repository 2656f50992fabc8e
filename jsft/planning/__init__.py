"""Will a run fit, and how will its program behave? Compiled, never run, on this machine.

`hlo` reads a compiled program's text, `checks` states what a good TPU program must not contain,
`roofline` bounds its step time, `compiled` builds and compiles a run's train step for simulated CPU
devices or a TPU topology, `search` looks for a setting that fits, `report` and `topology` are what
`python -m jsft.cli.plan` and `python -m jsft.cli.tpu` print.

Nothing is imported here: the modules import JAX, and the commands set its environment first
(`jsft.runtime.prepare_cpu_devices`, `prepare_tpu_compile`).
"""
