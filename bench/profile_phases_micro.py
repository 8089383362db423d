"""Before/after of the two pieces issue 22's profiling changed, timed alone at the profiling shape of
bench/profile_phases.py (hidden 768, ffn 3072, 32x256 tokens, batch 8): the Hessian hook's per-batch finiteness
check against one check of the sums' diagonals, and the old error log (five float copies, two syncs per layer)
against the new one. One thread, CPU time (process_time), min of repeats: robust to a shared machine's load.

    PYTHONPATH=. python bench/profile_phases_micro.py
"""
import time, torch, json
torch.set_num_threads(1)
from ptqlab.quantizers import check_finite
from ptqlab.methods.zeroquant import local_objective
torch.manual_seed(0)
h, f, tok_batch, batches = 768, 3072, 8 * 256, 4
def best(fn, n=5):
    out = []
    for _ in range(n):
        t = time.process_time(); fn(); out.append(time.process_time() - t)
    return min(out)
# 1. finiteness: per batch and distinct input (attn_in, attn_out, mlp_in [h]; mlp_out [f]) vs once from diagonals
xs = [torch.randn(tok_batch, d) for d in (h, h, h, f)]
sums = [torch.randn(d, d) for d in (h, h, h, f)]
old_check = best(lambda: [check_finite(x, "x") for _ in range(batches) for x in xs])
new_check = best(lambda: torch.stack([torch.isfinite(s.diagonal()).all() for s in sums]).tolist())
# the X^T X accumulation it sits beside, for scale
acc = best(lambda: [s.addmm_(x.t(), x) for _ in range(batches) for x, s in zip(xs, sums)], 2)
# 2. the error log of one block's six linears
shapes = [(h, h, 0), (h, h, 0), (h, h, 0), (h, h, 1), (f, h, 2), (h, f, 3)]
Hs = [(lambda a: 2 * a.t() @ a / a.shape[0])(torch.randn(4096, d)) for d in (h, h, h, f)]
Ws = [(torch.randn(o, i), torch.randn(o, i), Hs[g]) for o, i, g in shapes]
def old_log():
    for w0, wq0, H in Ws:
        w, wq = w0.float(), wq0.float()
        float(local_objective(w, wq, H) / ((w @ H * w).sum() / 2).clamp(min=1e-30))
        float((w0.float() - wq0.float()).norm() / w0.float().norm().clamp(min=1e-30))
def new_log():
    for w0, wq0, H in Ws:
        w = w0.float(); d = w - wq0.float()
        e = [d.norm() / w.norm().clamp(min=1e-30)]
        e.append(((d @ H * d).sum() / 2) / ((w @ H * w).sum() / 2).clamp(min=1e-30))
        torch.stack(e).tolist()
print(json.dumps({"finite_check_per_block_s": {"before": round(old_check, 4), "after": round(new_check, 5)},
                  "xtx_accumulation_per_block_s": round(acc, 4),
                  "log_per_block_s": {"before": round(best(old_log, 3), 4), "after": round(best(new_log, 3), 4)}}))
