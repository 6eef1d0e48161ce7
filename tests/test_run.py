"""The real entry point, in-process on the tiny recipe, and as a job submitted to a local Ray cluster."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import ray
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from colocate.config import ROOT, register
from colocate.metrics import read_metrics

pytestmark = pytest.mark.slow
FEW_STEPS = ["algorithm.steps=3", "algorithm.sft_steps=4", "algorithm.val_every=2", "algorithm.prompts_per_step=4",
             "algorithm.samples_per_prompt=4", "algorithm.checkpoint_every=3"]


def _run_main(tmp_path, overrides: list[str]) -> dict:
    """`python -m colocate.run +recipe=grpo *overrides`, in this process, writing into tmp_path."""
    from colocate.run import main

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["+recipe=grpo", *overrides, "placement.ray_address=local",
                                 f"hydra.runtime.output_dir={tmp_path}"])
    HydraConfig.instance().set_config(cfg)
    task_cfg = cfg.copy()  # what @hydra.main hands the task: the config without the `hydra` node
    with open_dict(task_cfg):
        del task_cfg["hydra"]
    try:
        return main(task_cfg)
    finally:
        ray.shutdown()


def test_entry_point_runs_every_stage(tmp_path):
    summary = _run_main(tmp_path, FEW_STEPS)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    steps = [r for r in rows if r["step"] >= 1]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:  # every stage ran and reported
        for key in ("reward_mean", "reward_std", "loss", "grad_norm", "generation_s", "training_s", "refit_ms",
                    "tokens_per_s", "sleep_wake_s", "weight_version", "step_s", "refit_share"):
            assert key in r, key
        assert r["refit_ms"] > 0
        assert r["generation_s"] + r["training_s"] + r["refit_ms"] / 1e3 <= r["step_s"]
        assert r["refit_share"] == pytest.approx((r["refit_ms"] / 1e3 + r["sleep_wake_s"]) / r["step_s"])
    assert [r["step"] for r in rows if "val_accuracy" in r] == [0, 2, 3]
    assert any("sft_nll" in r for r in rows)
    # one refit after the warm-up, one per step: the engines' weight version advanced each time
    assert [r["weight_version"] for r in steps] == [2, 3, 4]
    assert summary["weight_version"] == 4
    assert (tmp_path / "reward_curve.png").stat().st_size > 0
    assert (tmp_path / "step_time.png").stat().st_size > 0
    assert (tmp_path / "config.yaml").exists()
    assert any((tmp_path / "tensorboard").iterdir())
    assert (tmp_path / "checkpoints" / "step_00003").is_dir()


def test_gsm8k_file_with_chat_template_and_math_reward(tmp_path):
    """A user's dataset: GSM8K-format rows, the prompt through the tokenizer's chat template (asserted on the
    token ids the engine received), the math reward against "#### N" rationales."""
    from transformers import AutoTokenizer

    fixture = ROOT / "tests" / "fixtures" / "gsm8k_mini.jsonl"
    summary = _run_main(tmp_path, [
        f"data.path={fixture}", "data.prompt_key=question", "data.answer_key=answer", "reward.fn=math",
        "algorithm.steps=2", "algorithm.sft_steps=0", "algorithm.prompts_per_step=4", "algorithm.samples_per_prompt=2",
        "algorithm.max_new_tokens=8", "algorithm.val_every=0", "generation.max_model_len=256",
        "logging.plot=false", "logging.tensorboard=false"])
    tok = AutoTokenizer.from_pretrained(tmp_path / "tiny-model")
    assert tok.chat_template  # the tiny tokenizer has one: "auto" must apply it to a data file's prompts
    questions = [json.loads(line)["question"] for line in fixture.read_text().splitlines()]
    templated = {tuple(tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                          tokenize=False), add_special_tokens=False)): q
                 for q in questions}
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 2]
    for s in samples:
        assert tuple(s["prompt_ids"]) in templated  # exactly the chat-templated question, token for token
        assert s["prompt"].startswith("user: ") and s["prompt"].endswith("assistant:")
        assert s["answer"].split("####")[-1].strip().isdigit()  # the gold rationale reached the reward
        assert s["reward"] in (0.0, 1.0)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["step"] >= 1]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["reward_timeouts"] == 0 and r["reward_s"] > 0 for r in rows)
    assert summary["weight_version"] == 2  # no warm-up: one refit per step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_job_submitted_to_a_local_ray_cluster_finishes(tmp_path):
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    gcs, dash = _free_port(), _free_port()
    subprocess.run([f"{bin_dir}/ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=180)
    try:
        cmd = [f"{bin_dir}/ray", "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
               "--", sys.executable, "-m", "colocate.run", "+recipe=grpo", *FEW_STEPS,
               "algorithm.checkpoint_every=0", "logging.progress=false"]
        deadline = time.monotonic() + 600
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=deadline - time.monotonic())
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-4000:]
        assert "succeeded" in log.lower(), log[-4000:]
        summary = json.loads([line for line in log.splitlines() if line.startswith('{"val_accuracy_initial"')][-1])
        assert summary["weight_version"] == 4
    finally:
        subprocess.run([f"{bin_dir}/ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
