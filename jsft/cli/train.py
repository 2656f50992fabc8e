"""Train: `jsft-train --config=configs/<name>.py [--config.KEY=VALUE ...]` (also `python -m jsft.train`).

`--verbose` shows the libraries' logs; a configuration mistake ends as `jsft: config error: ...`, any other
JsftError as `jsft: error: ...`.
"""

from __future__ import annotations

from jsft import config, runtime, train
from jsft.cli import CONFIG_USAGE, command


@command(
    "jsft",
    usage=CONFIG_USAGE.format(
        prog="jsft-train",
        what="Trains per the config: encodes the data (cached), resumes or loads the model, runs the steps.",
    ),
)
def main(argv: list[str]) -> None:
    # before JAX starts libtpu: jsft's flags for the generation of TPU_ACCELERATOR_TYPE, the user's kept
    runtime.set_libtpu_defaults()
    train.run(config.load_or_exit(["jsft-train", *argv]))


if __name__ == "__main__":
    main()
