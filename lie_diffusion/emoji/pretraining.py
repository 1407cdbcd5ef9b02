"""What the emoji pretraining scripts share: flags, the pretraining emoji, captioned batches, the optimiser
loop with its EMA, safety stop and saves.

Each architecture's script (`train_scripts/pretrain_tiny_emoji_<name>.py`) brings only its model and its loss
(`step_loss`); the data, the schedule and the EMA are the same, so the models are comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from lie_diffusion.emoji.data import PALETTE, caption, load_renders, random_example

logger = logging.getLogger("lie_diffusion.emoji.pretraining")
_log_file_handler = None  # --log_file's handler, replaced by the next run in the same process


def add_pretraining_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every emoji pretraining script has; the same defaults, so the models see the same pictures."""
    parser.add_argument("--output_dir", type=Path, required=True, help="Where the pipeline folder is written.")
    parser.add_argument("--data_file", type=Path, default=None, help="Emoji renders (default: the shipped file).")
    parser.add_argument("--num_classes", type=int, default=32,
                        help="Pretrain on this many emoji (a seeded choice among the non-held-out ones); 0 = all.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_steps", type=int, default=11000)
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1.5e-3)
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--ema_decay", type=float, default=0.998)
    parser.add_argument("--uncond_prob", type=float, default=0.1, help="Empty captions, for guidance.")
    parser.add_argument("--no_color_prob", type=float, default=0.1, help="Captions without the colour.")
    parser.add_argument("--generic_prob", type=float, default=0.05, help="'an emoji on a ... background' captions.")
    parser.add_argument("--save_every", type=int, default=250, help="Also save the EMA pipeline every N steps.")
    parser.add_argument("--log_every", type=int, default=50)
    parser.add_argument("--max_minutes", type=float, default=0,
                        help="Safety stop: end training early (and say so) after this many minutes in all; 0 = never.")
    parser.add_argument("--log_file", type=Path, default=None, help="Also write the log to this file.")
    parser.add_argument("--num_threads", type=int, default=0,
                        help="torch CPU threads; 0 = torch's default (all cores). On a 2-core CPU that is busy "
                             "with other work, 1 is faster (no spinning OpenMP barriers against other processes).")


def choose_classes(names: list[str], held_out: list[str], count: int, seed: int) -> list[int]:
    """Indices of the pretraining emoji: all non-held-out ones, or a seeded subset of `count`."""
    pool = [i for i, name in enumerate(names) if name not in set(held_out)]
    if count and count < len(pool):
        pool = sorted(np.random.default_rng(seed).choice(pool, size=count, replace=False).tolist())
    return pool


def setup(args):
    """Logging, threads, seeds; (accelerator, numpy rng, renders, pretraining class indices)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    logging.basicConfig(format="%(asctime)s %(message)s")
    logging.getLogger().setLevel(logging.INFO)  # also where a caller had configured logging before
    global _log_file_handler
    if _log_file_handler is not None:  # an earlier run in this process
        logging.getLogger().removeHandler(_log_file_handler)
        _log_file_handler.close()
        _log_file_handler = None
    if args.log_file:
        args.log_file.parent.mkdir(parents=True, exist_ok=True)
        _log_file_handler = logging.FileHandler(args.log_file, mode="w")
        _log_file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logging.getLogger().addHandler(_log_file_handler)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    accelerator = Accelerator()
    set_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    renders = load_renders(args.data_file) if args.data_file else load_renders()
    classes = choose_classes(renders.names, renders.held_out, args.num_classes, args.seed)
    logger.info(f"{len(classes)} pretraining emoji of {len(renders.names)} ({len(renders.held_out)} held out); "
                f"palette {list(PALETTE)}; device {accelerator.device}")
    return accelerator, rng, renders, classes


def make_batch(renders, classes, batch_size, rng, args):
    """Images in [-1, 1] (B, 3, 32, 32) and their captions."""
    images, captions = [], []
    for index in rng.choice(classes, size=batch_size):
        image, color = random_example(renders, int(index), rng)
        roll = rng.random()
        if roll < args.uncond_prob:
            text = ""
        elif roll < args.uncond_prob + args.no_color_prob:
            text = caption(renders.names[index])
        elif roll < args.uncond_prob + args.no_color_prob + args.generic_prob:
            text = caption(None, color)
        else:
            text = caption(renders.names[index], color)
        images.append(image)
        captions.append(text)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, captions


def lr_lambda(warmup: int, total: int):
    """Linear warmup, then cosine decay to 10%."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


@contextlib.contextmanager
def ema_weights(params, ema):
    """The EMA values in `params` for the duration (a save), the trained ones back afterwards."""
    kept = [p.detach().clone() for p in params]
    with torch.no_grad():
        torch._foreach_copy_(params, ema)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, kept)


def train(accelerator, params, step_loss, args, save):
    """AdamW with warm-up and cosine decay, gradient clipping at 1, an EMA of `params`; `step_loss(step)` gives
    the step's loss. Logs every --log_every steps, calls `save(ema, label)` every --save_every steps, at the end,
    and when --max_minutes stops the run early (counted from `args.started`)."""
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, args.train_steps))
    optimizer = accelerator.prepare(optimizer)
    start, running = time.time(), []
    for step in range(args.train_steps):
        loss = step_loss(step)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        running.append(loss.item())
        if step % args.log_every == 0 or step == args.train_steps - 1:
            elapsed = time.time() - start
            logger.info(f"step {step:6d}  loss {np.mean(running):.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                        f"{elapsed:7.1f}s  ({elapsed / (step + 1):.3f} s/step)")
            running = []
        if args.max_minutes and time.time() - args.started > 60 * args.max_minutes and step + 1 < args.train_steps:
            logger.info(f"--max_minutes {args.max_minutes} reached: stopping after {step + 1} of {args.train_steps} "
                        "steps")
            save(ema, f"step {step + 1} of {args.train_steps} (stopped by --max_minutes)")
            return
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.train_steps:
            save(ema, f"step {step + 1}")
    save(ema, f"step {args.train_steps} (final)")


def record(args, label: str) -> dict:
    """For pretrain_args.json: the flags, where the run was when this copy was saved, the minutes it had taken."""
    return {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "started"},
            "saved_at": label, "minutes": round((time.time() - args.started) / 60, 1)}
