"""Pre-train the Fashion-MNIST denoiser and write its artifacts.

    python -m bench.diffusion.pretrain --out bench/diffusion/artifacts --results bench/results/diffusion

Trains a ``UNet2DConditionModel`` (``models.unet_config``) with the prompt-token table
(``models.build_token_table``) on the 60,000 Fashion-MNIST training images, as diffusers'
DreamBooth scripts train: DDPM noise at uniform timesteps, epsilon-prediction MSE. The
prompt is the image's class name, replaced by the null prompt with probability
``--cfg-drop`` for classifier-free guidance; rare tokens never appear. Weights are kept as
an exponential moving average and saved from it in fp16.

Runs for ``--steps`` steps, or until ``--max-seconds`` of training have passed (recorded
as ``stopped_by_time``). The learning rate is constant after warm-up, so a run stopped
by time follows the same trajectory as a run with ``--steps`` set to the steps it did. Fixed seeds and torch's deterministic-algorithm mode throughout;
on a GPU a few kernels (e.g. the backward of nearest upsampling) have no deterministic
form, so bitwise equality across runs holds on the CPU only.

Writes to ``--out``: ``denoiser.safetensors``, ``unet_config.json``,
``scheduler_config.json``; to ``--results``: ``pretrain.json`` (cost, losses,
environment), ``class_grid.png`` (a row per class: DDIM 50 steps with guidance),
``rare_grid.png`` (the same prompts with an untrained rare token in front) and
``class_samples.safetensors`` (uint8 samples per class, to check them with a classifier).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from . import assets, data, models, runtime, tokens

RESULTS = Path(__file__).resolve().parents[1] / "results" / "diffusion"


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options.

    Args:
        argv: the arguments; ``sys.argv[1:]`` by default.

    Returns:
        The parsed namespace.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(assets.ARTIFACTS), help="artifact folder")
    p.add_argument("--results", default=str(RESULTS), help="folder for the JSON record and grids")
    p.add_argument("--steps", type=int, default=12000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=250)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--cfg-drop", type=float, default=0.1)
    p.add_argument("--max-seconds", type=float, default=240.0, help="cap on training wall time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--grid-per-class", type=int, default=8)
    p.add_argument("--check-per-class", type=int, default=100, help="samples per class kept for checking")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=assets.DEFAULT_GUIDANCE)
    p.add_argument("--eval-items", type=int, default=2000, help="test images for the held-out loss")
    p.add_argument("--init-from", default=None,
                   help="continue from a saved denoiser folder (weights and token table) instead of a fresh init")
    p.add_argument("--fast-kernels", action="store_true",
                   help="seeded but without torch's deterministic-kernel mode (see runtime.make_deterministic)")
    p.add_argument("--previous-record", default=None,
                   help="pretrain.json of the run that made --init-from, kept inside this run's record")
    return p.parse_args(argv)


def _collect_warnings(store: list[str]):
    def show(message, category, filename, lineno, file=None, line=None):
        text = f"{category.__name__}: {str(message).splitlines()[0][:300]}"
        if text not in store:
            store.append(text)
            print("warning:", text, flush=True)
    warnings.showwarning = show


@torch.no_grad()
def heldout_loss(unet, table, scheduler, images, labels, seed: int, batch_size: int = 500) -> float:
    """Mean epsilon MSE of the denoiser on fixed noisy test images (no prompt dropping).

    Args:
        unet, table, scheduler: the denoiser, its token table and noise schedule.
        images: (N, 1, 32, 32) in [-1, 1] on the UNet's device.
        labels: (N,) class indices.
        seed: seed of the CPU generator for timesteps and noise.
        batch_size: images per call.

    Returns:
        The mean loss, a float.
    """
    total, count = 0.0, 0
    for s in range(0, len(labels), batch_size):
        b = assets.noisy_batch(images[s:s + batch_size], labels[s:s + batch_size], scheduler, table,
                               seed=seed + s, cfg_drop=0.0)
        pred = unet(b["sample"], b["timestep"], encoder_hidden_states=b["encoder_hidden_states"]).sample
        total += F.mse_loss(pred.float(), b["noise"].float(), reduction="sum").item()
        count += b["noise"].numel()
    return total / count


def main(argv=None) -> dict:
    """Pre-train, save the artifacts and the record.

    Args:
        argv: command-line arguments (see ``parse_args``).

    Returns:
        The record written to ``pretrain.json``.
    """
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file

    args = parse_args(argv)
    t_start = runtime.now()
    runtime.make_deterministic(args.seed, fast_kernels=args.fast_kernels)
    warned: list[str] = []
    _collect_warnings(warned)
    device = runtime.pick_device(args.device)
    out, results = Path(args.out), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    env = runtime.environment()
    print("environment:", env, flush=True)

    images_u8, labels = data.load_fashion_mnist("train")
    if args.train_limit:
        images_u8, labels = images_u8[:args.train_limit], labels[:args.train_limit]
    images = data.to_model_space(images_u8).to(device)
    labels = labels.to(device)
    n_train = len(labels)

    torch.manual_seed(args.seed)
    if args.init_from:
        unet, table, scheduler = assets.load_base(device, torch.float32, root=args.init_from)
        unet.train().requires_grad_(True)
        table.requires_grad_(True)
    else:
        unet = models.build_unet().to(device)
        table = models.build_token_table().to(device)
        scheduler = DDPMScheduler(**models.scheduler_config())
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"unet parameters: {n_params:,}; token table {tuple(table.weight.shape)}", flush=True)
    init_table = table.weight.detach().clone()

    params = list(unet.parameters()) + list(table.parameters())
    ema_unet, ema_table = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(table).requires_grad_(False)
    ema_params = list(ema_unet.parameters()) + list(ema_table.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0,
                            fused=device.type == "cuda")
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    use_bf16 = device.type == "cuda"

    losses, curve = [], []
    loss_acc = torch.zeros((), device=device)
    acc_n = 0
    perm, pos = None, n_train
    step = 0
    stopped_by_time = False
    runtime.sync(device)
    t0 = runtime.now()
    t_mark, step_mark = t0, 0
    unet.train()
    while step < args.steps:
        if pos + args.batch_size > n_train:
            perm, pos = torch.randperm(n_train, generator=gen, device=device), 0
        idx = perm[pos:pos + args.batch_size]
        pos += args.batch_size
        x0, y = images[idx], labels[idx]
        b = x0.shape[0]
        noise = torch.randn(x0.shape, generator=gen, device=device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen, device=device)
        drop = torch.rand(b, generator=gen, device=device) < args.cfg_drop
        a = alphas_cumprod[t].view(b, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        context = table(tokens.class_ids(y, drop))
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            pred = unet(xt, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - decay)
        loss_acc += loss.detach()
        acc_n += 1
        step += 1
        if step % args.log_every == 0 or step == args.steps or step == 50:
            mean = (loss_acc / acc_n).item()
            loss_acc.zero_()
            acc_n = 0
            now = runtime.now()
            rate = (step - step_mark) / (now - t_mark)
            t_mark, step_mark = now, step
            curve.append({"step": step, "loss": mean, "seconds": round(now - t0, 2)})
            print(f"step {step}/{args.steps} loss {mean:.4f} {rate:.1f} it/s "
                  f"({rate * args.batch_size:.0f} img/s) elapsed {now - t0:.1f}s", flush=True)
        losses.append(loss.detach())
        if len(losses) > 200:
            losses.pop(0)
        if runtime.now() - t0 > args.max_seconds and step < args.steps:
            stopped_by_time = True
            print(f"stopping at step {step}: training time cap {args.max_seconds}s reached", flush=True)
            break
    runtime.sync(device)
    train_seconds = runtime.now() - t0
    final_loss = torch.stack(losses).mean().item()
    print(f"trained {step} steps in {train_seconds:.1f}s; mean loss of the last {len(losses)} steps "
          f"{final_loss:.4f}", flush=True)

    # the EMA weights are the released ones; rare-token rows must be exactly as initialised
    rare = slice(tokens.RARE_OFFSET, tokens.RARE_OFFSET + len(tokens.RARE_TOKENS))
    rare_untouched = bool(torch.equal(ema_table.weight[rare].cpu(), init_table[rare].cpu()))
    meta = {"steps": step, "seed": args.seed, "torch": env["torch"], "diffusers": env["diffusers"]}
    path = assets.save_base(ema_unet, ema_table, scheduler, out, metadata=meta)
    print(f"saved {path} ({path.stat().st_size / 2**20:.2f} MiB); rare rows untouched: {rare_untouched}",
          flush=True)

    # everything below reads the saved fp16 artifact back, as the benchmark will
    t_eval = runtime.now()
    unet, table, scheduler = assets.load_base(device, torch.float32, root=out)
    test_u8, test_labels = data.load_fashion_mnist("test")
    pick = torch.randperm(len(test_labels), generator=torch.Generator().manual_seed(7))[:args.eval_items]
    test_loss = heldout_loss(unet, table, scheduler, data.to_model_space(test_u8[pick]).to(device),
                             test_labels[pick].to(device), seed=11)
    train_loss_eval = heldout_loss(unet, table, scheduler, images[:args.eval_items], labels[:args.eval_items], seed=11)
    print(f"held-out epsilon MSE (saved weights): test {test_loss:.4f}, train {train_loss_eval:.4f}", flush=True)

    rows, rare_rows, checks = [], [], {}
    for c, name in enumerate(tokens.CLASS_NAMES):
        rows.append(assets.sample_images(unet, table, scheduler, tokens.class_prompt(c), args.grid_per_class,
                                         seed=1000 + c, steps=args.sample_steps, guidance=args.guidance))
        rare_rows.append(assets.sample_images(unet, table, scheduler, tokens.subject_prompt("sks", c),
                                              args.grid_per_class, seed=1000 + c, steps=args.sample_steps,
                                              guidance=args.guidance))
        if args.check_per_class:
            checks[name] = data.to_uint8(assets.sample_images(
                unet, table, scheduler, tokens.class_prompt(c), args.check_per_class, seed=2000 + c,
                steps=args.sample_steps, guidance=args.guidance)).contiguous()
    data.save_grid(results / "class_grid.png", rows, list(tokens.CLASS_NAMES))
    data.save_grid(results / "rare_grid.png", rare_rows, [f"sks {n}" for n in tokens.CLASS_NAMES])
    if checks:
        save_file(checks, str(results / "class_samples.safetensors"),
                  metadata={"guidance": str(args.guidance), "steps": str(args.sample_steps),
                            "seeds": "2000 + class index"})
    runtime.sync(device)
    eval_seconds = runtime.now() - t_eval

    previous = None
    if args.previous_record:
        previous = json.loads(Path(args.previous_record).read_text())
    record = {
        "command": "python -m bench.diffusion.pretrain " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args),
        "environment": env,
        "unet_parameters": n_params,
        "token_table_shape": list(table.weight.shape),
        "vocab": list(tokens.VOCAB),
        "context_length": tokens.CONTEXT_LENGTH,
        "train_images": n_train,
        "steps_done": step,
        "steps_planned": args.steps,
        "stopped_by_time": stopped_by_time,
        "epochs": round(step * args.batch_size / n_train, 2),
        "train_seconds": round(train_seconds, 2),
        "gpu_seconds": round(train_seconds, 2) if device.type == "cuda" else 0.0,
        "steps_per_second": round(step / train_seconds, 2),
        "final_train_loss_last_200_steps": round(final_loss, 5),
        "heldout_eps_mse_test": round(test_loss, 5),
        "heldout_eps_mse_train": round(train_loss_eval, 5),
        "loss_curve": curve,
        "rare_rows_untouched": rare_untouched,
        "sampling": {"scheduler": "DDIM", "steps": args.sample_steps, "guidance": args.guidance, "eta": 0.0},
        "eval_and_sampling_seconds": round(eval_seconds, 2),
        "denoiser_bytes": path.stat().st_size,
        "nondeterminism_warnings": warned,
        "wall_seconds": round(runtime.now() - t_start, 2),
        "init_from": args.init_from,
        "fast_kernels": args.fast_kernels,
        "previous_stage": previous,
    }
    if previous is not None:
        record["total_steps"] = previous.get("total_steps", previous["steps_done"]) + step
        record["total_gpu_seconds"] = round(previous.get("total_gpu_seconds", previous["gpu_seconds"])
                                            + record["gpu_seconds"], 2)
    else:
        record["total_steps"], record["total_gpu_seconds"] = step, record["gpu_seconds"]
    runtime.write_json(results / "pretrain.json", record)
    print(f"done in {record['wall_seconds']}s", flush=True)
    return record


if __name__ == "__main__":
    main()
