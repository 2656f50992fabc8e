"""Converts a jsft checkpoint step into a Hugging Face model folder (see `jsft.export`).

jsft-export --checkpoint_dir=runs/tiny/checkpoints --output_dir=out/tiny-hf [--step=N]
    [--dtype=bfloat16] [--max_shard_size=5GB] [--push_to_hub=ORG/NAME] [--adapter_only] [--overwrite]
(or `python tools/convert_to_hf.py ...`, the same command)

A LoRA step becomes the base model with its factors merged in, or with --adapter_only a PEFT adapter
folder (adapter_config.json, adapter_model.safetensors) for `peft.PeftModel.from_pretrained`.
"""

from __future__ import annotations

import argparse

from jsft import export, units
from jsft.cli import command
from jsft.errors import JsftError


def hub_repo_id(text: str) -> str:
    """argparse type for --push_to_hub, so a bad repo id stops the command before converting."""
    try:
        return export.check_repo_id(text)
    except JsftError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jsft-export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", required=True, help="<output_dir>/checkpoints of a jsft run")
    parser.add_argument("--output_dir", required=True, help="where to write the Hugging Face folder")
    parser.add_argument("--step", type=int, default=None, help="a kept step (default: the latest)")
    parser.add_argument(
        "--dtype", choices=export.DTYPES, default=None, help="weights dtype (default: as trained)"
    )
    parser.add_argument(
        "--max_shard_size",
        default="5GB",
        help="largest safetensors file, e.g. 5GB or 500MB (GB: 10^9 bytes, GiB: 2^30)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --output_dir (the new folder is put in place only once complete)",
    )
    parser.add_argument(
        "--adapter_only",
        action="store_true",
        help="LoRA steps: write a PEFT adapter folder, not a merged model",
    )
    parser.add_argument(
        "--push_to_hub",
        type=hub_repo_id,
        default=None,
        metavar="ORG/NAME",
        help="upload the folder to this Hub model repo (token from HF_TOKEN or `hf auth login`)",
    )
    return parser.parse_args(argv)


@command("jsft.export")
def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.adapter_only:
        if args.push_to_hub:
            raise JsftError("--push_to_hub uploads full model folders; upload an adapter with peft")
        out = export.convert_adapter(
            args.checkpoint_dir, args.output_dir, args.step, args.dtype, overwrite=args.overwrite
        )
        print(f"wrote {out}")
        return
    out = export.convert(
        args.checkpoint_dir,
        args.output_dir,
        args.step,
        args.dtype,
        units.parse_size(args.max_shard_size),
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    if args.push_to_hub:
        print(f"uploaded to {export.push_to_hub(out, args.push_to_hub)}")


if __name__ == "__main__":
    main()
