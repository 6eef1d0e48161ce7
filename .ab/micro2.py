import time, torch
from colocate.bench.model_shapes import resolve_model, param_meta
from colocate.engine.direct_load import DirectLoader
path, _ = resolve_model("qwen2.5-1.5b")
meta = param_meta(path, torch.bfloat16)
class L(DirectLoader):
    def __init__(self, dst): self.dst, self.tp_size, self.model = dst, 1, None
# tiny dst/src with the true names; a copy of size-0 tensors ~ launch-free on CPU, measures Python
dst = {n: torch.empty(1, dtype=torch.bfloat16) for n, s in meta}
src = [(n, torch.empty(1, dtype=torch.bfloat16)) for n, s in meta]
l = L(dst)
def run(): l.load(src)
run(); t=time.perf_counter()
for _ in range(50): run()
print("load python", (time.perf_counter()-t)/50*1e3, "ms")
from colocate.refit.slices import slice_data
t=time.perf_counter()
for _ in range(50): [slice_data(x) for _, x in src]
print("slice_data", (time.perf_counter()-t)/50*1e3)
t=time.perf_counter()
for _ in range(50): [l._destination(n, x, None) for n, x in src]
print("_destination", (time.perf_counter()-t)/50*1e3)
t=time.perf_counter()
for _ in range(50): torch._foreach_copy_(list(dst.values()), [x for _, x in src])
print("foreach 338 cpu", (time.perf_counter()-t)/50*1e3)
from colocate.refit.plan import dtype_name
d={}
t=time.perf_counter()
for _ in range(50): d.update((n, (dtype_name(x.dtype), tuple(x.shape))) for n, x in src)
print("received update", (time.perf_counter()-t)/50*1e3)
