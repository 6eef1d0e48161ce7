"""The real entry point, in-process on the tiny recipe, and as a job submitted to a local Ray cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    summary = _run_main(tmp_path, [*FEW_STEPS, "policy.kl_coef=0.1", "refit.verify_every=2"])
    rows = read_metrics(tmp_path / "metrics.jsonl")
    steps = [r for r in rows if r["step"] >= 1]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:  # every stage ran and reported
        for key in ("reward_mean", "reward_std", "loss", "grad_norm", "generation_s", "training_s", "refit_ms",
                    "tokens_per_s", "sleep_wake_s", "weight_version", "step_s", "refit_share",
                    "prompt_cached_share"):
            assert key in r, key
        assert r["prompt_cached_share"] == 0  # the task's prompts are shorter than one KV block (128 on CPU)
        assert r["refit_ms"] > 0
        # Each side's whole task holds its timed parts and lies within the refit the driver timed.
        assert r["refit_pack_ms"] + r["refit_wait_ms"] <= r["refit_sender_task_ms"] <= r["refit_ms"]
        assert r["refit_load_ms"] <= r["refit_receiver_worker_ms"] <= r["refit_receiver_task_ms"] <= r["refit_ms"]
        assert r["generation_s"] + r["training_s"] + r["refit_ms"] / 1e3 <= r["step_s"]
        assert r["refit_share"] == pytest.approx((r["refit_ms"] / 1e3 + r["sleep_wake_s"]) / r["step_s"])
        # The reference (initial weights) vs a policy the warm-up has moved: a real KL, measured in time.
        assert r["kl"] > 0 and 0 < r["reference_s"] < r["training_s"]
    assert [r["step"] for r in rows if "val_accuracy" in r] == [0, 2, 3]
    # refit.verify_every=2: after step 2's refit the engine decoded 4 held-out prompts as HF did on the policy
    [verified] = [r for r in rows if "verify_prompts" in r]
    assert verified["step"] == 2 and verified["verify_greedy_equal"] == verified["verify_prompts"] == 4
    assert verified["verify_max_logprob_diff"] <= 2e-3 and verified["verify_s"] > 0
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


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Ray head exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s} s")


def test_job_submitted_to_a_local_ray_cluster_finishes(tmp_path):
    """The README's Ray-job commands on Ray 2.60 (token authentication): a fresh token, a head started with
    RAY_AUTH_MODE=token, `ray job submit --working-dir . -- python -m colocate.run ...`; the run's outputs land
    in logging.output_dir, outside Ray's private copy of the working directory.

    Differences from the README, for a shared test machine: free ports instead of the default ones, HOME in
    tmp_path (the token goes to $HOME/.ray/auth_token, not the user's), and `ray start --block` in a process
    group of its own, ended by its id at the end (`ray stop` would stop every Ray on the machine)."""
    bin_dir = os.path.dirname(sys.executable)
    # A short RAY_TMPDIR: Ray's unix sockets live under it, and their paths may not exceed 107 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path / "home"),
           "RAY_AUTH_MODE": "token", "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    out_dir = tmp_path / "run"
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=120)
    assert (tmp_path / "home" / ".ray" / "auth_token").is_file()
    gcs, dash = _free_port(), _free_port()
    with (tmp_path / "head.log").open("w") as head_log:
        head = subprocess.Popen(["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4",
                                 "--disable-usage-stats"], env=env, stdout=head_log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_for_port(dash, head, tmp_path / "head.log", timeout_s=180)
        cmd = ["ray", "job", "submit", "--working-dir", ".", "--", "python", "-m", "colocate.run", "+recipe=grpo",
               f"logging.output_dir={out_dir}", *FEW_STEPS, "algorithm.checkpoint_every=0", "logging.progress=false"]
        for _ in range(30):  # the dashboard listens a few seconds before the head's job agent does
            out = subprocess.run(cmd, cwd=ROOT, env={**env, "RAY_ADDRESS": f"http://127.0.0.1:{dash}"},
                                 capture_output=True, text=True, timeout=600)
            log = out.stdout + out.stderr
            if "No available agent to submit job" not in log:
                break
            time.sleep(2)
        assert out.returncode == 0, log[-4000:]
        assert "succeeded" in log.lower(), log[-4000:]
        summary = json.loads((out_dir / "summary.json").read_text())
        assert summary["weight_version"] == 4
        assert [r["step"] for r in read_metrics(out_dir / "metrics.jsonl") if r["step"] >= 1] == [1, 2, 3]
        assert (out_dir / "config.yaml").is_file() and (out_dir / "samples.jsonl").is_file()
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the head's processes as it exits
        head.wait(timeout=120)
        shutil.rmtree(ray_tmp, ignore_errors=True)
