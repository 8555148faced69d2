import time, torch
from qlora.attention import flex_stream, flash_varlen, build_block_mask, padded_length
torch.manual_seed(0)
def bench(fn, reps=10):
    for _ in range(3): fn()
    torch.cuda.synchronize(); t=time.perf_counter()
    for _ in range(reps): fn()
    torch.cuda.synchronize(); return (time.perf_counter()-t)/reps*1e3
n=8192; cu=torch.tensor([0,900,2000,2800,4100,5000,6200,7300,8192],dtype=torch.int32,device="cuda")
for dim, heads, kv in ((256,16,8),(128,32,8)):
    q=torch.randn(n,heads,dim,device="cuda",dtype=torch.bfloat16,requires_grad=True)
    k=torch.randn(n,kv,dim,device="cuda",dtype=torch.bfloat16,requires_grad=True)
    v=torch.randn(n,kv,dim,device="cuda",dtype=torch.bfloat16,requires_grad=True)
    g=torch.randn(n,heads,dim,device="cuda",dtype=torch.bfloat16)
    for name, f in (("flex cap", lambda: flex_stream(q,k,v,cu,1300,dim**-0.5,None,50.0)),
                    ("flex", lambda: flex_stream(q,k,v,cu,1300,dim**-0.5,None,None)),
                    ("varlen", lambda: flash_varlen(q,k,v,cu,1300,dim**-0.5,None,None))):
        try:
            fwd=bench(lambda: f()); 
            fb=bench(lambda: f().backward(g))
            print(f"d={dim} {name}: fwd {fwd:.2f} ms, fwd+bwd {fb:.2f} ms", flush=True)
        except Exception as e: print(name, "failed", str(e)[:300], flush=True)
mask_ms = bench(lambda: build_block_mask(cu, 8192, None))
print(f"build_block_mask {mask_ms:.2f} ms")
