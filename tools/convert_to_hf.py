"""Converts a jsft checkpoint step into a Hugging Face model folder: `jsft-export` (jsft.cli.export).

python tools/convert_to_hf.py --checkpoint_dir=runs/tiny/checkpoints --output_dir=out/tiny-hf [--step=N]
    [--dtype=bfloat16] [--max_shard_size=5GB] [--push_to_hub=ORG/NAME] [--adapter_only]
"""

from jsft.cli.export import main

if __name__ == "__main__":
    main()
