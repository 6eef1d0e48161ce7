"""Bad input is refused before anything starts: `python -m colocate.run` exits with code 2 within 5 s, the
last line of stderr names the key, file, line or row, and no Ray session was started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colocate.config import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "gsm8k_mini.jsonl"
GSM8K = [f"data.path={FIXTURE}", "data.prompt_key=question", "data.answer_key=answer"]
ROW = json.dumps({"prompt": "a", "answer": 1})
BOUND_S = 5.0  # the bound for every bad input


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _model_dir(tmp: Path, config: dict | None, tokenizer: bool = True) -> str:
    d = tmp / "model"
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    if tokenizer:
        (d / "tokenizer.json").write_text("{}")
    return str(d)


def _checkpoint(tmp: Path, step: int | None) -> str:
    """A checkpoint directory; with `step`, the driver's state of one written at that step."""
    d = tmp / "checkpoints" / "step_00004"
    d.mkdir(parents=True)
    if step is not None:
        (d / "trainer_state.json").write_text(json.dumps({"step": step, "policy_backend": "fsdp2"}))
    return str(d)


CASES = {  # name: (overrides, given tmp_path, the message's part that names what is wrong)
    "unknown key": (lambda t: ["+policy.learning_rate=1"], "unknown config key 'policy.learning_rate'"),
    "placement.mode": (lambda t: ["placement.mode=bogus"], "placement.mode: must be 'colocated' or 'split'"),
    "buffer size": (lambda t: ["refit.buffer_size_mb=-5"], "refit.buffer_size_mb: must be > 0"),
    "output_dir relative": (lambda t: ["logging.output_dir=runs/a"], "logging.output_dir: must be an absolute"),
    "model missing": (lambda t: ["model.path=/nonexistent"], "model.path: /nonexistent is not a directory"),
    "model no config": (lambda t: [f"model.path={_model_dir(t, None)}"], "has no config.json"),
    "model arch": (lambda t: [f"model.path={_model_dir(t, {'architectures': ['GPT2LMHeadModel']})}"],
                   "architecture GPT2LMHeadModel is not verified"),
    "model no tokenizer": (lambda t: [f"model.path={_model_dir(t, {'architectures': ['LlamaForCausalLM']}, False)}"],
                           "has no tokenizer"),
    "data missing": (lambda t: ["data.path=/nonexistent.jsonl"], "data.path: /nonexistent.jsonl does not exist"),
    "data bad line": (lambda t: ["data.path=" + _write(t / "d.jsonl", ROW + "\n\n{oops\n")],
                      "d.jsonl line 3 is not JSON"),
    "data empty": (lambda t: [f"data.path={_write(t / 'd.jsonl', '')}"], "d.jsonl has no rows"),
    "data one row": (lambda t: ["data.path=" + _write(t / "d.jsonl", ROW + "\n")], "1 row(s): too few"),
    "data missing key": (lambda t: [*GSM8K[:1], "data.prompt_key=problem", *GSM8K[2:]],
                         "gsm8k_mini.jsonl line 1 has no 'problem'"),
    "data key in row 2": (lambda t: ["data.path=" + _write(t / "d.csv", "prompt,answer\na,1\nb,\n")],
                          "d.csv row 1 has no 'answer'"),
    "data parquet": (lambda t: [f"data.path={_write(t / 'd.parquet', 'not parquet')}"],
                     "d.parquet does not parse as .parquet"),
    "data format": (lambda t: [f"data.path={_write(t / 'd.txt', 'x')}"], "unknown format '.txt'"),
    "template": (lambda t: [*GSM8K, "data.template='{problem} Answer:'"],
                 "data.template names the field {problem}, which"),
    "reward import": (lambda t: ["reward.fn=no_such_module_xyz:score"], "reward.fn: cannot import 'no_such_module"),
    "reward missing": (lambda t: ["reward.fn=tests.reward_fns:missing"], "module 'tests.reward_fns' has no 'missing'"),
    "reward name": (lambda t: ["reward.fn=maths"], "reward.fn: 'maths' is neither a built-in"),
    "eval_samples greedy": (lambda t: ["algorithm.eval_samples=4", "algorithm.temperature=0"],
                            "algorithm.eval_samples: pass@4 samples at algorithm.temperature, which is 0"),
    "resume missing": (lambda t: ["algorithm.resume_from=/nonexistent/step_00002"],
                       "algorithm.resume_from: '/nonexistent/step_00002' is not a directory"),
    "resume not a checkpoint": (lambda t: [f"algorithm.resume_from={_checkpoint(t, None)}"],
                                "step_00004 has no trainer_state.json"),
    "resume past the end": (lambda t: ["algorithm.steps=4", f"algorithm.resume_from={_checkpoint(t, 4)}"],
                            "step_00004 is at step 4; algorithm.steps=4 leaves no step to run"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_at_once_with_one_line(name, tmp_path):
    overrides, expected = CASES[name]
    ray_tmp = tmp_path / "ray"
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "colocate.run", "+recipe=grpo", "placement.ray_address=local",
           f"hydra.run.dir={tmp_path / 'out'}", *overrides(tmp_path)]
    start = time.monotonic()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-3000:]
    assert lines and lines[-1].startswith("error: ") and expected in lines[-1], out.stderr[-3000:]
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]  # one line, no traceback
    assert "Traceback" not in out.stderr
    assert elapsed < BOUND_S, f"{elapsed:.1f} s"
    assert not ray_tmp.exists(), "a Ray session was started"
