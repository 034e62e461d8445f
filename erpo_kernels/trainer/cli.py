"""``erpo-train`` console script: ``erpo-train [--key=value ...]``; see ``erpo_kernels.trainer.train``."""
from __future__ import annotations

import sys
from typing import List, Optional


def usage() -> str:
    """The trainer's docstring, then every option with its default and comment (TrainConfig's source)."""
    import importlib
    import inspect

    from erpo_kernels.trainer.config import TrainConfig

    train_module = importlib.import_module("erpo_kernels.trainer.train")
    lines = inspect.getsource(TrainConfig).splitlines()
    fields = [line.strip() for line in lines if line.startswith("    ") and not line.startswith("     ")
              and (": " in line or line.strip().startswith("# ---"))]
    fields = fields[:next(i for i, line in enumerate(fields) if line.startswith("def "))] if any(
        line.startswith("def ") for line in fields) else fields
    options = "\n".join("  " + ("--" + line if not line.startswith("#") else line) for line in fields)
    return f"{train_module.__doc__}\noptions (--key=value; TrainConfig defaults):\n{options}"


def main(argv: Optional[List[str]] = None) -> int:
    from erpo_kernels.trainer.config import describe, parse_args

    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(usage())
        return 0
    try:
        cfg = parse_args(args)
    except ValueError as e:
        print(f"erpo-train: {e}", file=sys.stderr)
        return 2
    print(f"erpo-train {describe(cfg)}", flush=True)
    if cfg.compare:
        from erpo_kernels.trainer.compare import compare, parse_entries

        try:
            entries = parse_entries(cfg.compare)
        except ValueError as e:
            print(f"erpo-train: {e}", file=sys.stderr)
            return 2
        compare(cfg, entries)
    else:
        from erpo_kernels.trainer.train import train

        train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
