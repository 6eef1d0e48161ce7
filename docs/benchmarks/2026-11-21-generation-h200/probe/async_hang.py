"""Why does vLLM's multiprocess engine core hang on the device? Start engines in child processes with
faulthandler armed in every Python process (a sitecustomize on PYTHONPATH), dump all stacks after DUMP_S."""
import os, subprocess, sys, tempfile, time
OUT = os.environ.get("OUT", "/tmp/diag-out"); DUMP_S, KILL_S = int(sys.argv[1]), int(sys.argv[2])
os.makedirs(OUT, exist_ok=True)
from colocate.models.tiny import build_tiny_model
model = str(build_tiny_model("/tmp/diag-tiny", seed=0, dtype="bfloat16"))
variants = {
    "async_env_mp0": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},   # what devenv.sh sets: the failing GPU test
    "async_env_mp1": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
    "sync_mp1": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
    "async_mp1_nosleep": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
    "sync_mp1_nosleep": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
}
only = sys.argv[3].split(",") if len(sys.argv) > 3 else list(variants)
procs = {}
for name in only:
    d = os.path.join(OUT, name); os.makedirs(d, exist_ok=True)
    site = tempfile.mkdtemp()
    with open(os.path.join(site, "sitecustomize.py"), "w") as f:
        f.write("import faulthandler, os, sys\n"
                f"_f = open(os.path.join({d!r}, f'stacks-{{os.getpid()}}.txt'), 'w')\n"
                "_f.write(' '.join(sys.argv) + '\\n'); _f.flush()\n"
                f"faulthandler.dump_traceback_later({DUMP_S}, repeat=True, file=_f)\n")
    env = dict(os.environ, **variants[name], VLLM_LOGGING_LEVEL="DEBUG",
               PYTHONPATH=site + ":" + os.environ.get("PYTHONPATH", ""))
    log = open(os.path.join(d, "log.txt"), "w")
    procs[name] = (subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "async_child.py"), name, model], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True), time.time())
    time.sleep(2)
for name, (p, t) in procs.items():
    try:
        rc = p.wait(timeout=max(1, KILL_S - (time.time() - t)))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9); rc = "KILLED (hung)"
    print(f"== {name}: rc={rc}", flush=True)
    lines = open(os.path.join(OUT, name, "log.txt")).read().splitlines()
    print("\n".join(l for l in lines if l.startswith("[")))
    print("\n".join(lines[-6:]))
