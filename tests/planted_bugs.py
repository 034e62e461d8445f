"""Plant known bugs in a scratch copy of the tree and check that the default CPU suite catches each one.

    python -m tests.planted_bugs                # every bug, stop each run at its first failure (-x)
    python -m tests.planted_bugs --all          # count every failing test per bug (slower)
    python -m tests.planted_bugs --only kl_direction_reference

Not collected by pytest (no ``test_`` prefix).  Each bug is a one-line textual change to one file; a bug is
planted in the oracle and in the production code separately, since a test that compares the two catches a
bug on one side only if the other side does not call it.  The tree is copied (tracked and untracked files
that git does not ignore), the change applied, and ``python -m pytest -q`` run there with this interpreter.
Exit status 1 if any planted bug survives the suite.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (file, text to find (exactly once), replacement)
BUGS = {
    "kl_direction_reference": ("erpo_kernels/reference.py", "delta = ref_logprobs - logprobs",
                               "delta = logprobs - ref_logprobs"),
    "kl_direction_production": ("erpo_kernels/surrogate.py",
                                "loss = loss + config.kl_beta * (ref_ratio - (ref_logprobs - lp) - 1.0)",
                                "loss = loss + config.kl_beta * (ref_ratio - (lp - ref_logprobs) - 1.0)"),
    "kl_direction_triton": ("erpo_kernels/ops/surrogate.py", "        delta = ref - lp\n",
                            "        delta = lp - ref\n"),
    "dual_clip_sign_reference": ("erpo_kernels/reference.py", "bound = -config.dual_clip_c * advantages",
                                 "bound = config.dual_clip_c * advantages"),
    "dual_clip_sign_production": ("erpo_kernels/surrogate.py", "bound = -config.dual_clip_c * advantages",
                                  "bound = config.dual_clip_c * advantages"),
    "dual_clip_sign_triton": ("erpo_kernels/ops/surrogate.py", "        bound = -dual_clip_c * adv\n",
                              "        bound = dual_clip_c * adv\n"),
    "seq_mean_token_sum_weight_reference": (
        "erpo_kernels/reference.py", "return torch.stack([token_loss[i][mask[i]].sum() for i in range(B)]).mean()",
        "return torch.stack([token_loss[i][mask[i]].sum() for i in range(B)]).mean() / 2"),
    "seq_mean_token_sum_weight_production": ("erpo_kernels/surrogate.py",
                                             "denominator = count if count is not None else float(rows)\n",
                                             "denominator = count if count is not None else float(2 * rows)\n"),
    "holder_root_reference": ("erpo_kernels/reference.py",
                              "return torch.sign(s) * s.abs().clamp_min(config.eps) ** (1.0 / p)",
                              "return torch.sign(s) * s.abs().clamp_min(config.eps) ** (2.0 / p)"),
    "holder_root_production": ("erpo_kernels/surrogate.py", "mean.abs().clamp_min(config.eps).pow(1.0 / p)",
                               "mean.abs().clamp_min(config.eps).pow(2.0 / p)"),
    "cum_entropy_total_reference": ("erpo_kernels/reference.py",
                                    "total_h = sum(h for h, m in zip(row_entropy, row_mask) if m)",
                                    "total_h = 1.05 * sum(h for h, m in zip(row_entropy, row_mask) if m)"),
    "cum_entropy_total_production": ("erpo_kernels/advantages.py", "total_h = cum[:, -1:]\n",
                                     "total_h = cum[:, -1:] * 1.05\n"),
    "cum_entropy_total_triton": ("erpo_kernels/ops/buckets.py", "total_h = h_carry\n",
                                 "total_h = h_carry * 1.05\n"),
    "triton_interpret_at_import": ("tests/ops/test_buckets.py", "import pytest\n",
                                   "import os\nos.environ.setdefault(\"TRITON_INTERPRET\", \"1\")\nimport pytest\n"),
}


def _tree_files():
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    return [f for f in listed if f and (ROOT / f).is_file()]


def plant(name: str, scratch: Path) -> None:
    path, old, new = BUGS[name]
    text = (scratch / path).read_text()
    if text.count(old) != 1:
        raise SystemExit(f"{name}: expected exactly one {old!r} in {path}, found {text.count(old)}")
    (scratch / path).write_text(text.replace(old, new))


def snapshot(target: Path) -> Path:
    """Copy the tree as it is now (later edits to the working tree do not leak into the runs)."""
    for f in _tree_files():
        (target / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, target / f)
    return target


def run(name: str, source: Path, stop_first: bool) -> tuple:
    with tempfile.TemporaryDirectory(prefix=f"plant-{name}-") as tmp:
        scratch = Path(tmp) / "tree"
        shutil.copytree(source, scratch)
        plant(name, scratch)
        args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", "--no-header"]
        begin = time.time()
        result = subprocess.run(args + (["-x"] if stop_first else []), cwd=scratch, capture_output=True, text=True)
        failed = [line.split(" ")[1] for line in result.stdout.splitlines() if line.startswith("FAILED ")]
        if not failed:
            failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
        summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-300:]
        return result.returncode != 0, summary, failed, time.time() - begin


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all", action="store_true", help="run the whole suite for each bug (count failures)")
    parser.add_argument("--only", default=None, help="comma-separated bug names")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(BUGS)
    survived = []
    source = snapshot(Path(tempfile.mkdtemp(prefix="plant-source-")))
    for name in names:
        caught, summary, failed, seconds = run(name, source, stop_first=not args.all)
        shown = ", ".join(failed[:3]) + (f" (+{len(failed) - 3} more)" if len(failed) > 3 else "")
        print(f"{'CAUGHT ' if caught else 'MISSED '} {name:40s} {seconds:5.0f} s  {summary}\n        {shown}",
              flush=True)
        if not caught:
            survived.append(name)
    shutil.rmtree(source, ignore_errors=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
