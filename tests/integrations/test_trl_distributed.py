"""The TRL adapter across processes: 2 CPU processes (gloo DDP) where every group of completions spans both ranks.

One ``torchrun`` launch runs a script (written to a temp dir: a module here must not train when imported) that
trains TRL's own ``GRPOTrainer`` and the ERPO trainer side by side on each rank and writes a JSON report per rank.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

TWO_PROCESSES = textwrap.dedent("""
    import json, os, sys
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from erpo_kernels import erpo_advantages
    from erpo_kernels.integrations import ERPOGRPOConfig, ERPOGRPOTrainer
    from erpo_kernels.trainer.models import build_preset

    torch.set_num_threads(1)
    out = sys.argv[1]
    prompts = [f"{a}+{b}=" + "?" * (a % 3) for a in range(4) for b in range(4)]   # prompt widths differ per rank
    data = Dataset.from_dict({"prompt": prompts, "answer": [str(a + b) for a in range(4) for b in range(4)]})

    def reward(prompts, completions, answer, **_):
        return [float(c.strip().startswith(a)) + 0.1 * (len(c) % 3) for c, a in zip(completions, answer)]

    class Grads(TrainerCallback):
        def __init__(self, model):
            self.model, self.steps = model, []
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.steps.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})

    class Checked(ERPOGRPOTrainer):
        # the advantages of this rank's rows against one erpo_advantages call on the batch gathered by hand
        slices = []
        def _erpo_token_advantages(self, batch, rewards):
            mine = super()._erpo_token_advantages(batch, rewards)
            acc = self.accelerator
            whole = {k: acc.gather(acc.pad_across_processes(batch[k], dim=1, pad_first=k.startswith("prompt")))
                     for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
            logprobs, entropy = self._sequence_stats(self.model, whole)
            full = erpo_advantages(rewards, whole["completion_mask"].bool(), entropy, logprobs,
                                   self._reference_logprobs(whole), group_size=4, config=self.erpo_config).advantages
            rows, width = mine.shape
            first = acc.process_index * rows
            self.slices.append([float((mine - full[first:first + rows, :width]).abs().max()), float(full.abs().max())])
            return mine

    def run(cls, config_cls, **extra):
        model, tok = build_preset("tiny", seed=0)
        grads = Grads(model)
        # 2 rows per process, groups of 4: every group straddles the two processes
        args = config_cls(output_dir=os.path.join(out, cls.__name__), max_steps=2, learning_rate=1e-2,
                          per_device_train_batch_size=2, gradient_accumulation_steps=2, steps_per_generation=2,
                          num_generations=4, max_completion_length=8, loss_type="dapo", max_grad_norm=0.0,
                          optim="sgd", use_cpu=True, bf16=False, report_to="none", save_strategy="no", seed=0,
                          disable_tqdm=True, ddp_backend="gloo", **extra)
        trainer = cls(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                      callbacks=[grads])
        trainer.train()
        return trainer, grads.steps

    ours, our_steps = run(ERPOGRPOTrainer, ERPOGRPOConfig, erpo_mode="grpo")
    theirs, their_steps = run(GRPOTrainer, GRPOConfig)
    erpo, _ = run(Checked, ERPOGRPOConfig, erpo_mode="erpo")
    report = dict(
        processes=ours.accelerator.num_processes,
        same_completions=all(torch.equal(a["completion_ids"], b["completion_ids"])
                             for a, b in zip(ours._buffered_inputs, theirs._buffered_inputs)),
        grad_error=[max(float((a[n] - b[n]).abs().max()) for n in b) for a, b in zip(our_steps, their_steps)],
        grad_scale=[max(float(g.abs().max()) for g in b.values()) for b in their_steps],
        erpo_slices=Checked.slices)
    with open(os.path.join(out, f"rank{ours.accelerator.process_index}.json"), "w") as f:
        json.dump(report, f)
""")


@pytest.mark.slow
def test_trl_two_processes_groups_straddle_ranks(tmp_path):
    """2 CPU processes (gloo DDP), 2 rows each, groups of 4: every group spans both ranks.  grpo mode's
    accumulated (all-reduced) gradients equal TRL's; erpo mode's advantages of each rank equal one call on the
    gathered batch (up to the hidden states' rounding under the gathered batch's wider prompt padding)."""
    script = tmp_path / "two_processes.py"
    script.write_text(TWO_PROCESSES)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(tmp_path)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")  # the children's only
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["processes"] == 2 and report["same_completions"]
        assert len(report["grad_error"]) == 2
        assert all(error <= 1e-5 * scale for error, scale in zip(report["grad_error"], report["grad_scale"]))
        assert len(report["erpo_slices"]) == 2
        assert all(error <= 1e-4 * scale for error, scale in report["erpo_slices"])
