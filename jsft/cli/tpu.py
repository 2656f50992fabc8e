"""`python -m jsft.cli.tpu --topology=v5p-64[,v6e-64] --config=FILE [--config.KEY=VALUE]`: one JSON report
per TPU slice of the config's train step compiled by the TPU compiler on this CPU machine (needs libtpu:
`pip install 'jsft[tpu]'`). tools/tpu_check.py and tools/roofline.py print the same reports for people.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

from jsft import config, hardware, runtime
from jsft.cli import command
from jsft.errors import JsftError

# What tools/tpu_check.py and tools/roofline.py compile unless told otherwise.
TOOL_DEFAULTS = ("--topology=v5p-64,v6e-64", "--config=configs/tulu.py", "--config.model.attention=splash")


def with_tool_defaults(argv: list[str]) -> list[str]:
    """`argv` with each of TOOL_DEFAULTS it does not set itself added (the program name stays first)."""
    given = {a.split("=", 1)[0] for a in argv[1:]}
    return [argv[0], *(a for a in TOOL_DEFAULTS if a.split("=", 1)[0] not in given), *argv[1:]]


def reports(argv: list[str]) -> Iterator[tuple[str, dict]]:
    """(topology, `topology_report`) for each of `--topology=A[,B]` with `--config=FILE [--config.KEY=V]`;
    a missing topology, a bad config or an unknown topology ends the program with one line."""
    names = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--topology=")]
    if not names:
        sys.exit(f"{argv[0]}: give --topology=NAME[,NAME] (" + ", ".join(hardware.TOPOLOGIES) + ")")
    runtime.prepare_tpu_compile(names[-1].split(","))  # jsft's libtpu flags for these slices
    from jsft.planning import topology  # only now: JAX starts its backends with the environment just set

    files = [a for a in argv[1:] if a.startswith("--config=")]  # the file before its overrides
    overrides = [a for a in argv[1:] if not a.startswith(("--topology=", "--config="))]
    cfg = config.load_or_exit([argv[0], *files, *overrides])
    try:
        for name in names[-1].split(","):
            yield name, topology.topology_report(cfg, name)
    except JsftError as e:
        sys.exit(f"{argv[0]}: {e}")


USAGE = """usage: jsft-tpu --topology=v5p-64[,v6e-64] --config=configs/<name>.py [--config.KEY=VALUE ...]

One JSON report per TPU slice: the config's train step compiled by the TPU compiler on this machine
(libtpu: pip install 'jsft[tpu]'): memory, collectives, async pairs, roofline."""


@command("jsft.tpu", usage=USAGE)
def main(argv: list[str]) -> None:
    for _, report in reports(["jsft.tpu", *argv]):
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
