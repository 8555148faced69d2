"""Session 15: a lean layer's gradient against finite differences of its own loss (fp32, tiny Llama, dropout 0.3):
<grad, d> vs (L(p + eps d) - L(p - eps d)) / 2 eps, the same seed for every forward."""
import os, sys, torch
sys.path.insert(0, '.')
from qlora.config import LoraConfig, ModelConfig
from qlora.model import build_model
dev = torch.device(os.environ.get('DEV', 'cuda'))
ids = torch.randint(0, 1000, (2, 200), generator=torch.Generator().manual_seed(1)).to(dev)
for lean in (False, True):
    cfg = ModelConfig(name='configs/tiny/model', random_init=True, random_init_cache='/tmp/rc', recompute_activations=False,
                      compile_layers=True, lean_layers=lean, attn_implementation='sdpa')
    model = build_model(cfg, LoraConfig(r=16, dropout=0.3), 'fp32', dev, 0)
    ps = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ps:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    def f():
        torch.manual_seed(5)
        return model(input_ids=ids, labels=ids).loss
    for _ in range(2):
        model.zero_grad(); loss = f(); loss.backward()
    d = [p.grad / max(q.grad.abs().max() for q in ps) for p in ps]  # along the gradient: a strong signal
    gd = sum((p.grad * x).sum() for p, x in zip(ps, d)).item()
    eps = 1e-3
    def shift(k):
        with torch.no_grad():
            for p, x in zip(ps, d):
                p.add_(k * eps * x)
    shift(1); lp = f().item(); shift(-2); lm = f().item(); shift(1)
    fd = (lp - lm) / (2 * eps)
    print(f"lean={lean} rng={os.environ.get('QLORA_LEAN_RNG')} loss {loss.item():.6f} g.d {gd:.5f} fd {fd:.5f} rel {abs(gd - fd) / abs(fd):.2e}")
