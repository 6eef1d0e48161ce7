import time, torch
from colocate.bench.model_shapes import resolve_model, param_meta
from colocate.refit.plan import plan, tensor_meta
from colocate.refit.ipc import wire
path, _ = resolve_model("qwen2.5-1.5b")
meta = param_meta(path, torch.bfloat16)
# tiny tensors of the right count (storage lookups cost the same)
tensors = [(n, torch.empty(0, dtype=torch.bfloat16)) for n, s in meta]
full = [(n, "bfloat16", tuple(s)) for n, s in meta]
def t(label, fn, k=50):
    fn(); s=time.perf_counter()
    for _ in range(k): r=fn()
    print(f"{label}: {(time.perf_counter()-s)/k*1e3:.3f} ms"); return r
m = t("plan", lambda: plan(full, 1<<30))
t("digest", lambda: m.digest())
t("tensor_meta", lambda: tensor_meta(tensors))
def loop():
    out=[]
    for e,(n,x) in zip(m.entries, tensors):
        st=x.untyped_storage(); b=st.data_ptr(); out.append(wire.Source("abc", x.data_ptr()-b, "bfloat16"))
        tuple(x.shape)==e.shape
    return out
src = t("storage loop", loop)
t("data_ptr only", lambda: [x.data_ptr() for _,x in tensors])
msg = wire.Direct(1, 2, [], src)
enc = t("encode", lambda: wire.encode(b"tok", msg))
t("decode", lambda: wire.decode(b"tok", enc, to_receiver=True))
print(len(full), len(enc[1]))
t("sig loop", lambda: [(n, x.data_ptr(), x.dtype, x.shape, x.is_contiguous()) for n, x in tensors])
t("one_copy-ish", lambda: all(x.is_cpu and x.device.index is None and x.is_contiguous() for _, x in tensors))
a=[(n, x.data_ptr(), x.dtype, x.shape, x.is_contiguous()) for n, x in tensors]; b=list(a)
t("sig compare", lambda: a==b)
t("list meta compare", lambda: list(full)==full)
