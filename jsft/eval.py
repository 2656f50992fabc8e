"""`python -m jsft.eval --model=... --tasks=...`: scored evaluation after training (jsft-eval; the command
is jsft/cli/eval.py, the scoring jsft/evaluate.py)."""

if __name__ == "__main__":
    from jsft.cli.eval import main

    main()
