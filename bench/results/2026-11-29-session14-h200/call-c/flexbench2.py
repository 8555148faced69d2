import time, torch
from torch.nn.attention.flex_attention import flex_attention
import qlora.attention as A
torch.manual_seed(0)
def bench(fn, reps=10):
    for _ in range(3): fn()
    torch.cuda.synchronize(); t=time.perf_counter()
    for _ in range(reps): fn()
    torch.cuda.synchronize(); return (time.perf_counter()-t)/reps*1e3
n=8000; cu=torch.tensor([0,900,2000,2800,4100,5000,6200,7300,8000],dtype=torch.int32,device="cuda")
dim, heads, kv = 256, 16, 8
q=torch.randn(n,heads,dim,device="cuda",dtype=torch.bfloat16,requires_grad=True)
k=torch.randn(n,kv,dim,device="cuda",dtype=torch.bfloat16,requires_grad=True)
v=torch.randn(n,kv,dim,device="cuda",dtype=torch.bfloat16,requires_grad=True)
g=torch.randn(n,heads,dim,device="cuda",dtype=torch.bfloat16)
variants = {"default": A._compiled_flex,
            "max-autotune": torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")}
for name, fn in variants.items():
    t0=time.perf_counter()
    f=lambda: A.flex_stream(q,k,v,cu,1300,dim**-0.5,None,50.0, flex=fn)
    f().backward(g); torch.cuda.synchronize(); first=time.perf_counter()-t0
    print(f"{name}: first call {first:.1f} s, fwd {bench(f):.2f} ms, fwd+bwd {bench(lambda: f().backward(g)):.2f} ms", flush=True)
print("varlen no cap: fwd+bwd %.2f ms" % bench(lambda: A.flash_varlen(q,k,v,cu,1300,dim**-0.5,None,None).backward(g)))
