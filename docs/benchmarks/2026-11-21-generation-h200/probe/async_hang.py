"""Does vLLM's engine core start in a child process on the device? (Session 1 suspected a hang.)

    python docs/benchmarks/2026-11-21-generation-h200/probe/async_hang.py DUMP_S KILL_S [VARIANT,...]

Starts one engine per variant at once, each in its own process (`async_child.py`), with faulthandler armed in
every Python process they start (a sitecustomize on PYTHONPATH) so that a hang leaves every stack in
$OUT/<variant>/stacks-<pid>.txt after DUMP_S seconds; kills a variant still running after KILL_S.
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from colocate.models.tiny import build_tiny_model

VARIANTS = {
    "async_env_mp0": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},  # as /tmp/devenv.sh sets it
    "async_env_mp1": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
    "sync_mp1": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
    "async_mp1_nosleep": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
    "sync_mp1_nosleep": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
}
SITECUSTOMIZE = """import faulthandler, os, sys
_f = open(os.path.join({out!r}, f"stacks-{{os.getpid()}}.txt"), "w")
_f.write(" ".join(sys.argv) + "\\n"); _f.flush()
faulthandler.dump_traceback_later({dump_s}, repeat=True, file=_f)
"""


def main() -> None:
    out = Path(os.environ.get("OUT", "/tmp/engine-start-probe"))
    dump_s, kill_s = int(sys.argv[1]), int(sys.argv[2])
    names = sys.argv[3].split(",") if len(sys.argv) > 3 else list(VARIANTS)
    model = str(build_tiny_model("/tmp/probe-tiny", seed=0, dtype="bfloat16"))
    child = Path(__file__).with_name("async_child.py")
    procs = {}
    for name in names:
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        site = tempfile.mkdtemp()
        Path(site, "sitecustomize.py").write_text(SITECUSTOMIZE.format(out=str(d), dump_s=dump_s))
        env = dict(os.environ, **VARIANTS[name], VLLM_LOGGING_LEVEL="DEBUG",
                   PYTHONPATH=site + ":" + os.environ.get("PYTHONPATH", ""))
        with open(d / "log.txt", "w") as log:
            procs[name] = (subprocess.Popen([sys.executable, str(child), name, model], env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True), time.time())
        time.sleep(2)
    for name, (proc, started) in procs.items():
        try:
            rc: object = proc.wait(timeout=max(1.0, kill_s - (time.time() - started)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            rc = "KILLED (hung)"
        print(f"== {name}: rc={rc}", flush=True)
        lines = (out / name / "log.txt").read_text().splitlines()
        print("\n".join(line for line in lines if line.startswith("[")))
        print("\n".join(lines[-6:]))


if __name__ == "__main__":
    main()
