#!/usr/bin/env python3
"""Train one of ptqlab's small testbed language models (OPT, BLOOM or Llama) from scratch.

The models are transformers' own ``OPTForCausalLM`` / ``BloomForCausalLM`` / ``LlamaForCausalLM``
built from a config (vocab 8192, hidden 256, 6 layers, 8 heads, FFN 1024, tied embeddings), trained on
random 512-token windows of ``DATA/train.bin`` (see train_tokenizer.py) with AdamW, a
linear-warmup + cosine learning-rate schedule and bf16 autocast. The held-out loss on
``DATA/heldout.bin`` (non-overlapping 512-token windows, every token predicted once) is
evaluated periodically; the best checkpoint by held-out loss is saved in fp16 safetensors
with its config, generation config and the tokenizer (``save_pretrained``).

Training stops at ``--max-steps`` or after ``--time-budget`` seconds of training,
whichever comes first. With a time budget, the length of the cosine schedule is planned
from the measured step time after ``--plan-after`` steps (and re-planned once at
``--replan-at``), so that the schedule ends when the budget does.

Example (GPU):
  python scripts/testbed/train.py --arch opt --data scripts/testbed/build \\
      --out runs/opt --time-budget 210 --batch-size 128
CPU smoke test:
  python scripts/testbed/train.py --arch bloom --data scripts/testbed/build --out /tmp/b \\
      --max-steps 6 --batch-size 2 --eval-every 3 --eval-windows 4 --device cpu
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def build_model(arch: str, vocab_size: int, seq_len: int, dropout: float, bos: int, pad: int,
                hidden: int = 256, layers: int = 6, heads: int = 8, ffn: int = 1024, kv_heads: int = 0):
    """The testbed architecture; the defaults are the shipped ~7M models (BLOOM's FFN is always 4 x hidden)."""
    from transformers import (BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig,
                              OPTForCausalLM)

    common = dict(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=bos, pad_token_id=pad,
                  tie_word_embeddings=True, use_cache=True)
    if arch == "opt":
        cfg = OPTConfig(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
            max_position_embeddings=seq_len, word_embed_proj_dim=hidden, do_layer_norm_before=True,
            activation_function="relu", dropout=dropout, attention_dropout=0.0, layerdrop=0.0,
            enable_bias=True, layer_norm_elementwise_affine=True, init_std=0.02, **common,
        )
        model = OPTForCausalLM(cfg)
    elif arch == "bloom":
        cfg = BloomConfig(
            hidden_size=hidden, n_layer=layers, n_head=heads, hidden_dropout=dropout, attention_dropout=0.0,
            layer_norm_epsilon=1e-5, initializer_range=0.02, apply_residual_connection_post_layernorm=False,
            pretraining_tp=1, slow_but_exact=False, **common,
        )
        model = BloomForCausalLM(cfg)
    elif arch == "llama":
        # Llama 3's shape at small scale: RMSNorm, SwiGLU (ffn = its width), rotary positions, grouped-query
        # attention, no biases. max_position_embeddings = the training window, so ptqlab evaluates on 512
        # tokens as for OPT; rope_theta 10000 is plenty at this length.
        cfg = LlamaConfig(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv_heads or heads, intermediate_size=ffn, hidden_act="silu",
            max_position_embeddings=seq_len, rms_norm_eps=1e-5, rope_theta=10000.0, attention_bias=False,
            mlp_bias=False, attention_dropout=0.0, initializer_range=0.02, **common,
        )
        model = LlamaForCausalLM(cfg)
        if dropout > 0:
            add_residual_dropout(model, dropout)
    else:
        raise ValueError(arch)
    model.tie_weights()
    return model


def add_residual_dropout(model, p: float) -> None:
    """Dropout on what each Llama attention and MLP adds to the residual stream, while training only.

    Llama has no residual dropout of its own (OPT's ``dropout`` / BLOOM's ``hidden_dropout`` are exactly
    this); the ~60M members need it against overfitting the 19.4M-token corpus. Forward hooks leave the
    saved model a plain ``LlamaForCausalLM``, and they are inactive in eval mode.
    """
    import torch.nn.functional as F

    def hook(module, args, output):
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, True), *output[1:])
        return F.dropout(output, p, True)

    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def count_params(model) -> dict:
    seen, total = set(), 0
    for p in model.parameters():  # parameters() already de-duplicates tied weights
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb = model.get_input_embeddings().weight.numel()
    return {"total_unique": total, "input_embedding": emb, "non_embedding": total - emb}


def load_tokens(path: Path) -> np.ndarray:
    """uint16 token ids from ``path``, or from ``path.xz`` (the family's token files travel compressed)."""
    if path.exists():
        return np.fromfile(path, dtype=np.uint16)
    xz = path.with_name(path.name + ".xz")
    if xz.exists():
        import lzma

        return np.frombuffer(lzma.decompress(xz.read_bytes()), dtype=np.uint16)
    raise FileNotFoundError(f"no token file {path} (or {xz.name})")


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast_ctx(device: torch.device, enabled: bool):
    if enabled and device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def train_step(fwd, model, optim, window: torch.Tensor, device: torch.device, use_amp: bool,
               grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of next-token loss on ``window`` [batch, seq + 1]; returns (loss, grad norm)."""
    with autocast_ctx(device, use_amp):
        logits = fwd(input_ids=window[:, :-1]).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), window[:, 1:].reshape(-1))
    optim.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optim.step()
    return loss, gnorm


@torch.no_grad()
def evaluate(model, held: torch.Tensor, seq_len: int, batch: int, device, use_amp: bool,
             max_windows: int | None = None) -> tuple[float, int]:
    """Mean next-token loss over non-overlapping windows: inputs held[i*L:(i+1)*L], targets shifted by 1."""
    model.eval()
    n_win = (held.numel() - 1) // seq_len
    if max_windows:
        n_win = min(n_win, max_windows)
    tot, cnt = 0.0, 0
    starts = torch.arange(n_win, device=held.device) * seq_len
    offs = torch.arange(seq_len + 1, device=held.device)
    for i in range(0, n_win, batch):
        idx = starts[i:i + batch, None] + offs[None, :]
        w = held[idx].to(device, non_blocking=True)
        with autocast_ctx(device, use_amp):
            logits = model(input_ids=w[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1), reduction="sum")
        tot += loss.item()
        cnt += w[:, 1:].numel()
    model.train()
    return tot / cnt, cnt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["opt", "bloom", "llama"], required=True)
    ap.add_argument("--data", type=Path, default=Path("scripts/testbed/build"),
                    help="folder with train.bin, heldout.bin, tokens_meta.json, tokenizer/")
    ap.add_argument("--out", type=Path, required=True, help="output model folder (save_pretrained)")
    ap.add_argument("--log", type=Path, default=None, help="JSONL log (default: OUT.parent/ARCH_train_log.jsonl)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256, help="hidden size (the shipped ~7M models: 256)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=1024, help="OPT's FFN / Llama's SwiGLU width (BLOOM's is 4 x hidden)")
    ap.add_argument("--kv-heads", type=int, default=0, help="Llama's key/value heads (0 = as many as --heads)")
    ap.add_argument("--extra-heldout", type=Path, default=None,
                    help="another uint16 token file: the saved model's loss on it is added to the summary")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--time-budget", type=float, default=0.0, help="seconds of training (0 = no limit)")
    ap.add_argument("--plan-after", type=int, default=40, help="steps timed before planning the schedule")
    ap.add_argument("--replan-at", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=0, help="cap on held-out windows (0 = all)")
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-amp", action="store_true", help="disable bf16 autocast")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    args = ap.parse_args(argv)

    t_start = time.time()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    use_amp = not args.no_amp
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(args.seed)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    import transformers

    meta = json.loads((args.data / "tokens_meta.json").read_text())
    vocab, bos, pad = meta["vocab_size"], meta["bos_id"], meta["pad_id"]
    train_np = load_tokens(args.data / "train.bin")
    held_np = load_tokens(args.data / "heldout.bin")
    assert train_np.size == meta["files"]["train.bin"]["tokens"], "train.bin does not match tokens_meta.json"
    # whole corpus fits on the device: sample windows there
    train = torch.from_numpy(train_np.astype(np.int64)).to(device)
    held = torch.from_numpy(held_np.astype(np.int64)).to(device)

    model = build_model(args.arch, vocab, args.seq_len, args.dropout, bos, pad,
                        args.hidden, args.layers, args.heads, args.ffn, args.kv_heads).to(device)
    params = count_params(model)
    model.train()
    fwd = torch.compile(model) if args.compile else model

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt_kwargs = dict(lr=args.lr, betas=(0.9, args.beta2), eps=1e-8)
    if device.type == "cuda":
        opt_kwargs["fused"] = True
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], **opt_kwargs)

    log_path = args.log or (args.out.parent / f"{args.arch}_train_log.jsonl")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logf = open(log_path, "w")

    def log(rec: dict) -> None:
        logf.write(json.dumps(rec) + "\n")
        logf.flush()

    header = {
        "event": "start", "arch": args.arch, "args": {k: str(v) for k, v in vars(args).items()},
        "params": params, "train_tokens": int(train_np.size), "heldout_tokens": int(held_np.size),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "tokens_per_step": args.batch_size * args.seq_len,
    }
    log(header)
    print(json.dumps(header), flush=True)

    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed + 1)
    offs = torch.arange(args.seq_len + 1, device=device)
    n_start = train.numel() - args.seq_len - 1
    eval_windows = args.eval_windows or None

    plan_steps = args.max_steps
    best = (float("inf"), -1)
    best_state = None
    curve = []
    t_train0 = None
    t_eval_total = 0.0
    step = 0
    tokens_seen = 0
    loss_acc, loss_n = 0.0, 0
    stop_reason = "max_steps"
    t_log = time.time()
    tok_log = 0

    def do_eval(step: int) -> None:
        nonlocal best, best_state, t_eval_total
        te = time.time()
        hl, ntok = evaluate(fwd, held, args.seq_len, args.eval_batch, device, use_amp, eval_windows)
        t_eval_total += time.time() - te
        improved = hl < best[0]
        if improved:
            best = (hl, step)
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        elapsed = time.time() - t_train0 if t_train0 else 0.0
        rec = {"event": "eval", "step": step, "tokens": tokens_seen, "heldout_loss": round(hl, 5),
               "heldout_ppl": round(math.exp(hl), 3), "best": improved, "eval_tokens": ntok,
               "elapsed_s": round(elapsed, 2)}
        curve.append(rec)
        log(rec)
        print(f"[eval] step {step:6d} tokens {tokens_seen / 1e6:8.1f}M heldout_loss {hl:.4f} "
              f"ppl {math.exp(hl):8.2f}{'  *best*' if improved else ''}", flush=True)

    while True:
        if step == 0 or (step % args.eval_every == 0):
            do_eval(step)
        if step >= plan_steps:
            stop_reason = "max_steps" if plan_steps == args.max_steps else "planned_steps"
            break
        if args.time_budget > 0 and t_train0 is not None and time.time() - t_train0 >= args.time_budget:
            stop_reason = "time_budget"
            break
        if step == 5:
            # start timing after a few warm-up steps (allocator, kernels, compile)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_train0 = time.time()
            t_eval_total = 0.0
            tokens_at_t0 = tokens_seen
        if args.time_budget > 0 and step in (5 + args.plan_after, args.replan_at) and t_train0 is not None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            el = time.time() - t_train0 - t_eval_total
            per_step = el / (step - 5)
            eval_cost = t_eval_total / max(1, step - 5)
            remaining = args.time_budget - (time.time() - t_train0)
            # the first 5 untimed steps count as done; leave a small margin
            new_plan = step + int(0.97 * remaining / (per_step + eval_cost + 1e-9))
            plan_steps = max(step + 1, min(args.max_steps, new_plan))
            rec = {"event": "plan", "step": step, "sec_per_step": round(per_step, 5), "plan_steps": plan_steps}
            log(rec)
            print(json.dumps(rec), flush=True)

        lr = lr_at(step, args.lr, args.warmup, plan_steps, args.min_lr_ratio)
        for g in optim.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, n_start, (args.batch_size,), device=device, generator=gen)
        w = train[starts[:, None] + offs[None, :]]
        loss, gnorm = train_step(fwd, model, optim, w, device, use_amp, args.grad_clip)
        step += 1
        tokens_seen += w[:, :-1].numel()
        tok_log += w[:, :-1].numel()
        loss_acc += loss.detach()
        loss_n += 1
        if step % args.log_every == 0:
            tl = (loss_acc / loss_n).item()
            now = time.time()
            tps = tok_log / (now - t_log)
            t_log, tok_log = now, 0
            rec = {"event": "train", "step": step, "tokens": tokens_seen, "lr": lr, "train_loss": round(tl, 5),
                   "grad_norm": round(float(gnorm), 4), "tok_per_s": round(tps),
                   "elapsed_s": round(now - t_train0, 2) if t_train0 else 0.0}
            log(rec)
            if step % (args.log_every * 5) == 0:
                print(f"step {step:6d}/{plan_steps} loss {tl:.4f} lr {lr:.2e} gnorm {float(gnorm):.3f} "
                      f"{tps / 1e3:8.1f}k tok/s", flush=True)
            loss_acc, loss_n = 0.0, 0
            if not math.isfinite(tl):
                stop_reason = "non_finite_loss"
                break

    if step % args.eval_every != 0 or stop_reason == "non_finite_loss":
        do_eval(step)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_time = time.time() - t_train0 if t_train0 else 0.0
    timed_tokens = tokens_seen - (tokens_at_t0 if t_train0 else 0)
    tok_per_s = timed_tokens / max(1e-9, train_time - t_eval_total)

    # ---- save the best checkpoint in fp16 ----
    model.load_state_dict(best_state)
    model.eval()
    model.half()
    model.config.use_cache = True
    try:
        model.config.dtype = torch.float16
    except Exception:  # pragma: no cover - older configs
        model.config.torch_dtype = torch.float16
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.generation_config.bos_token_id = bos
    model.generation_config.eos_token_id = bos
    model.generation_config.pad_token_id = pad
    model.save_pretrained(str(out))
    for f in (args.data / "tokenizer").iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)

    # ---- reload what was saved and check it (fp16 weights, no autocast) ----
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_dtype = torch.float16 if device.type == "cuda" else torch.float32
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=check_dtype).to(device)
    tok = AutoTokenizer.from_pretrained(str(out))
    final_loss, ntok = evaluate(reloaded, held, args.seq_len, args.eval_batch, device, False, eval_windows)
    size = sum(f.stat().st_size for f in out.iterdir())
    extra = {}
    if args.extra_heldout is not None:
        xh = torch.from_numpy(load_tokens(args.extra_heldout).astype(np.int64)).to(device)
        xl, xn = evaluate(reloaded, xh, args.seq_len, args.eval_batch, device, False)
        extra = {"extra_heldout": str(args.extra_heldout), "extra_heldout_loss": round(xl, 5),
                 "extra_heldout_ppl": round(math.exp(xl), 3), "extra_heldout_tokens": xn}
    summary = {
        "event": "summary", "arch": args.arch, "stop_reason": stop_reason, "steps": step,
        "best_step": best[1], "best_heldout_loss_bf16": round(best[0], 5),
        "saved_heldout_loss": round(final_loss, 5), "saved_heldout_ppl": round(math.exp(final_loss), 3),
        "saved_eval_dtype": str(check_dtype), "eval_tokens": ntok,
        "tokens_seen": tokens_seen, "tokens_seen_at_best": best[1] * args.batch_size * args.seq_len,
        "epochs": round(tokens_seen / train_np.size, 2),
        "train_wall_s": round(train_time, 1), "eval_wall_s": round(t_eval_total, 1),
        "tok_per_s": round(tok_per_s), "total_wall_s": round(time.time() - t_start, 1),
        "params": params, "saved_bytes": size, "saved_files": sorted(f.name for f in out.iterdir()),
        "tokenizer_len": len(tok), "device": header["device"], **extra,
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    log(summary)
    logf.close()
    print(json.dumps(summary, indent=1), flush=True)
    return 0 if math.isfinite(final_loss) else 1


if __name__ == "__main__":
    sys.exit(main())
