"""Start one vLLM engine (`AsyncLLM`, or `LLM`), generate, call the workers, sleep and wake; run by
`async_hang.py` as `python async_child.py VARIANT MODEL_DIR`. Prints a line per stage with the elapsed time."""

import asyncio
import sys
import time

VARIANT, MODEL = sys.argv[1], sys.argv[2]
SLEEP_MODE = "nosleep" not in VARIANT
T0 = time.time()
ENGINE = dict(model=MODEL, dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.15,
              kv_cache_memory_bytes=256 << 20, max_model_len=256, enable_sleep_mode=SLEEP_MODE,
              worker_extension_cls="colocate.refit.vllm_ext.ColocateRefitExtension")
PROMPT = {"prompt_token_ids": [1, 5, 9]}


def say(*parts: object) -> None:
    print(f"[{VARIANT} +{time.time() - T0:.1f}s]", *parts, flush=True)


async def run_async() -> None:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(disable_log_stats=True, **ENGINE))
    say("engine up")
    final = None
    async for out in engine.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0), request_id="r1"):
        final = out
    say("generated", final.outputs[0].token_ids)
    say("rpc", await engine.collective_rpc("colocate_device_key"))
    if SLEEP_MODE:
        await engine.sleep(level=2)
        await engine.wake_up(tags=["weights"])
        await engine.wake_up(tags=["kv_cache"])
        say("sleep/wake ok")
    engine.shutdown()


def run_sync() -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(**ENGINE)
    say("engine up")
    out = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    say("generated", out[0].outputs[0].token_ids)


if __name__ == "__main__":
    if VARIANT.startswith("async"):
        asyncio.run(run_async())
    else:
        run_sync()
    say("done")
