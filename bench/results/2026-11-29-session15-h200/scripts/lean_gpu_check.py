"""Session 15: lean layers on CUDA keep the loss and gradient of standard compiled layers (tiny Llama, fp32, sdpa, dropout 0.3)."""
import sys, torch
sys.path.insert(0, '.')
from pathlib import Path
from qlora.config import LoraConfig, ModelConfig
from qlora.model import build_model
sys.path.insert(0, 'tests')
from test_loop import compiled_saved_bytes, lora_grads  # noqa: E402
import os
dev = torch.device(os.environ.get('DEV', 'cuda'))
ids = torch.randint(0, 1000, (2, 200), generator=torch.Generator().manual_seed(1)).to(dev)
def run(lean):
    cfg = ModelConfig(name='configs/tiny/model', random_init=True, random_init_cache='/tmp/rc', recompute_activations=False,
                      compile_layers=True, lean_layers=lean, attn_implementation='sdpa')
    model = build_model(cfg, LoraConfig(r=16, dropout=0.3), 'fp32', dev, 0)
    for n, p in model.named_parameters():
        if 'lora_B' in n:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator(device=dev).manual_seed(2))
    torch.manual_seed(1)
    loss = model(input_ids=ids, labels=ids).loss
    saved = compiled_saved_bytes(loss)
    loss.backward()
    return loss.detach(), lora_grads(model), saved
(l0, g0, s0), (l1, g1, s1) = run(False), run(True)
worst = max(((g1[k] - g0[k]).abs().max() / g0[k].abs().max()).item() for k in g0)
print(f"lean on CUDA: loss {l0.item():.6f} vs {l1.item():.6f}, worst relative grad diff {worst:.2e}, saved {s0} -> {s1} bytes")
print("LEAN_GPU_CHECK", "PASS" if abs(l0 - l1) < 1e-5 and worst < 1e-4 and s1 < 0.8 * s0 else "FAIL")
