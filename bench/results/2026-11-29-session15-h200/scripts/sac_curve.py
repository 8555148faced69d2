"""Session 15 diagnostic: the compiled layers' saved-activation budget (torch._functorch.config.
activation_memory_budget) against whole-layer recompute, Llama-2-7B job as shipped (random weights)."""
import dataclasses, json, os, sys, time
sys.path.insert(0, 'bench')
from compare_trl import with_every_lever, run_steps, summary, n_params  # noqa: E402
import torch  # noqa: E402
import torch._functorch.config as fc  # noqa: E402
from qlora.data import prepare_data  # noqa: E402
from qlora.prompts import build_prompter  # noqa: E402
from qlora.memory import step_peak_gib  # noqa: E402
from qlora.model import apply_levers, build_model, load_tokenizer, resolve_device  # noqa: E402

shape, steps, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
variants = [v.split(':') for v in sys.argv[4:]]  # (std|lean):(none|all|N)
cfg = with_every_lever('configs/llama2-7b-korquad.yaml', shape,
                       [f"model.tokenizer={os.environ['TOKENIZER']}", f"data.source={os.environ['DATA']}",
                        "model.random_init=true", *extra])
fc.enable_autograd_cache = False
tokenizer = load_tokenizer(cfg.model)
data = prepare_data(cfg.data, build_prompter(tokenizer, cfg.data.format, cfg.data.chat_template_kwargs), cfg.train.seed)
device = resolve_device(cfg.train.device)
model = build_model(cfg.model, cfg.lora, cfg.train.precision, device, cfg.train.seed)
from qlora.batching import data_order  # noqa: E402
order = data_order(data.rows, cfg.data, cfg.train, tokenizer.pad_token_id)
params = n_params(cfg)
import qlora.lean  # noqa: E402
for b, rec in variants:
    if '@' in b:
        b, budget = b.split('@')
        if float(budget) != qlora.lean.LEAN_BUDGET:
            qlora.lean.LEAN_BUDGET = float(budget)
            torch._dynamo.reset()
    rng = '1' if b == 'leanrng' else '0'
    if b.startswith('lean') and os.environ.get('QLORA_LEAN_RNG', '0') != rng:
        os.environ['QLORA_LEAN_RNG'] = rng
        torch._dynamo.reset()
    m = dataclasses.replace(cfg.model, recompute_activations=rec != 'none', lean_layers=b.startswith('lean'),
                            recompute_layers=None if rec in ('all', 'none') else int(rec))
    apply_levers(model, m, cfg.train.precision)
    if device.type == 'cuda':
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    res = run_steps(model, cfg, order, device, steps + 1)
    timed = res[1:]
    peaks = [s["mem"] for s in timed]
    row = {"recompute": rec, "lean": b, "lean_budget": qlora.lean.LEAN_BUDGET, "first_step_s": res[0]["seconds"], "step_s": [round(x["seconds"], 3) for x in res], "losses": [s["loss"] for s in res],
           **summary(sum(s["tokens"] for s in timed), sum(s["seconds"] for s in timed), steps, params,
                     max(filter(None, (step_peak_gib(x) for x in peaks)), default=None),
                     max(filter(None, (x.get("peak_reserved_gib") for x in peaks)), default=None))}
    print(json.dumps(row), flush=True)
