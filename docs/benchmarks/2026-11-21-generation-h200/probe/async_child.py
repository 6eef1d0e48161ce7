"""One vLLM engine start + one request; run by async_hang.py with a variant name."""
import asyncio, os, sys, time
variant, model = sys.argv[1], sys.argv[2]
t0 = time.time()
def say(*a): print(f"[{variant} +{time.time()-t0:.1f}s]", *a, flush=True)
kw = dict(model=model, dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.15,
          kv_cache_memory_bytes=256 << 20, max_model_len=256, enable_sleep_mode="nosleep" not in variant,
          worker_extension_cls="colocate.refit.vllm_ext.ColocateRefitExtension")
if variant.startswith("async"):
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    async def main():
        eng = AsyncLLM.from_engine_args(AsyncEngineArgs(disable_log_stats=True, **kw))
        say("engine up")
        final = None
        async for out in eng.generate({"prompt_token_ids": [1, 5, 9]}, SamplingParams(max_tokens=8, temperature=0),
                                      request_id="r1"):
            final = out
        say("generated", final.outputs[0].token_ids)
        say("rpc", await eng.collective_rpc("colocate_device_key"))
        if "nosleep" not in variant:
            await eng.sleep(level=2); await eng.wake_up(tags=["weights"]); await eng.wake_up(tags=["kv_cache"])
        say("sleep/wake ok")
        eng.shutdown()
    asyncio.run(main())
else:
    from vllm import LLM, SamplingParams
    llm = LLM(**kw)
    say("engine up")
    say("generated", llm.generate([{"prompt_token_ids": [1, 5, 9]}], SamplingParams(max_tokens=8, temperature=0),
                                  use_tqdm=False)[0].outputs[0].token_ids)
say("done")
