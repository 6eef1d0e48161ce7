import socket, time, torch, tempfile
from colocate.models.tiny import build_tiny_model
from colocate.policy.worker import PolicyWorker
from colocate.policy import weights as W
from colocate.refit.plan import manifest_meta_of
torch.set_num_threads(1)
p = build_tiny_model(tempfile.mkdtemp(), num_layers=28, tie_word_embeddings=True, seed=1)
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
w = PolicyWorker(model_path=str(p), rank=0, world_size=1, master_addr="127.0.0.1", master_port=port, device="cpu",
                 param_dtype="float32", lr=1e-3, micro_batch_size=2)
def t(label, fn, k=20):
    fn(); s=time.perf_counter()
    for _ in range(k): r = fn()
    print(f"{label}: {(time.perf_counter()-s)/k*1e3:.3f} ms"); return r
m = t("weights_manifest", lambda: w.weights_manifest(torch.bfloat16))
print(len(m))
t("manifest_meta_of", lambda: manifest_meta_of(m))
t("reshard", lambda: W.reshard(w.model))
refs = W._state_refs(w.model); fmt = W.checkpoint_format(w.model)
def res():
    out=[]
    for name, module, attr in refs:
        x = getattr(module, attr)
        if isinstance(x, W.DTensor) and x.device_mesh.size() != 1: return None
        x = W._local(x)
        fmt.is_identity(name); x.is_contiguous(); out.append((name, x))
    return out
t("resident loop (no reshard)", res)
t("refit_sources gen", lambda: w.refit_sources(torch.bfloat16))
xs=[getattr(m,a) for _,m,a in refs]
t("getattr", lambda: [getattr(m,a) for _,m,a in refs])
t("isinstance+mesh", lambda: [isinstance(x, W.DTensor) and x.device_mesh.size() for x in xs])
t("_local", lambda: [W._local(x) for x in xs])
t("local_tensor only", lambda: [x._local_tensor for x in xs])
t("is_identity", lambda: [fmt.is_identity(n) for n,_,_ in refs])
def man():
    out=[]
    for name, module, attr in refs:
        x = module._parameters.get(attr)
        if x is None: x = module._buffers[attr]
        out += [(n, shape, torch.bfloat16) for n, shape in fmt.meta(name, tuple(x.shape), torch.bfloat16)]
    return out
assert man() == m
t("manifest via refs", man)
fs=[mm for mm in w.model.modules() if isinstance(mm, W.FSDPModule)]
print(len(fs), len(list(w.model.modules())))
t("reshard cached list", lambda: [mm.reshard() for mm in fs])
t("local+ptr", lambda: [(x._local_tensor if isinstance(x, W.DTensor) else x).data_ptr() for x in xs])
w.shutdown()
