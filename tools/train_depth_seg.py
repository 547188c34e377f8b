#!/usr/bin/env python3
"""Trains the bundled depth + segmentation model (vkg.depth_seg arch "vits14-mini") on procedural
scenes (vkg.scenes) on the CPU, exports it, and evaluates it.

    PYTHONPATH=tools/python /usr/bin/python3 tools/train_depth_seg.py train --minutes 25
    PYTHONPATH=tools/python /usr/bin/python3 tools/train_depth_seg.py eval
    PYTHONPATH=tools/python /usr/bin/python3 tools/train_depth_seg.py eval-vkg --vkg build/release/tools/vkg
    PYTHONPATH=tools/python /usr/bin/python3 tools/train_depth_seg.py export
    PYTHONPATH=tools/python /usr/bin/python3 tools/train_depth_seg.py samples

Model: DINOv2-style ViT (D 96, 12 blocks, 3 heads, FFN 384, patch 14) whose every FFN is MoE-LoRA
(E 8, top-2, rank 4, alpha 8), DPT depth head on blocks 3/6/9/12 (features 32, out channels
24/48/96/96), BN seg head on blocks 9-12 (pyramid, 5 classes: sky, ground, wall, box, sphere).
There is no pretrained backbone at this width, so everything trains from scratch, the "frozen"
FFN base included (the MoE-LoRA recipe freezes it only on top of a pretrained DINOv2).

Targets: `depth` is trained as inverse depth in 1/m (Depth Anything's convention: larger is
nearer, sky 0), L1 over every pixel on the output before its final ReLU (which would otherwise
stop the gradient of pixels predicted below 0); seg: cross-entropy; plus 0.01 x the Switch
load-balance loss E * sum_e f_e P_e averaged over the blocks. Batches are rendered on the fly
(every training image is new). The learning rate follows a cosine over the time budget, so a run
stops on time with a decayed rate. Use --threads 1 (the default) on a shared machine.

Files (default directory samples/depth_seg): depth_seg_mini.pth (the state_dict in
vkg.depth_seg's layout: loads with `python3 -m vkg depth-seg CKPT --arch vits14-mini ...`),
depth_seg_mini.vkg (fp16 weights, input image (batch, 3, 112, 112), outputs depth, seg_logits),
train_log.txt, and held-out scenes (seeds 0..n-1; training uses seeds >= 10^6) in images/:
scene_k.png (RGB, what samples/depth_seg reads by default), scene_k_input.npy (normalized
(1, 3, H, W) f32 for `vkg run --input image=...`), scene_k_depth.npy (z-depth in m, 0 = sky),
scene_k_labels.png (class ids).

Eval: AbsRel = mean |d' - d| / d over pixels with ground-truth depth (not sky), d' = 1 / predicted
inverse depth, reported without scaling (the camera is fixed, so depth is metric) and with
per-image median scaling; delta1 = share of pixels with max(d'/d, d/d') < 1.25; mIoU over the 5
classes, accumulated over all eval images.
"""

import argparse
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vkg import depth_seg, scenes  # noqa: E402

DEFAULT_DIR = os.path.join(HERE, "..", "samples", "depth_seg")
NAME = "depth_seg_mini"
CONFIG = dict(arch="vits14-mini", classes=len(scenes.CLASSES), experts=8, top_k=2, lora_rank=4,
              lora_alpha=8, seg_head="pyramid")
SIZE = 112
TRAIN_SEED0 = 10 ** 6
AUX_COEF = 0.01
DEPTH_KIND = ("inverse depth in 1/m (larger is nearer; sky 0) for a 60-degree horizontal field "
              "of view")


def make_model(seed=0):
    torch.manual_seed(seed)
    m = depth_seg.DepthSegModel(**CONFIG)
    for p in m.parameters():
        p.requires_grad_(True)          # from scratch: the FFN base trains too
    with torch.no_grad():
        # start the depth output near the mean target (about 0.2 / m) rather than at a random
        # sign: the final ReLU would otherwise hide most pixels from the loss at the start
        m.depth_head.scratch.output_conv2[2].bias.fill_(0.2)
    return m.set_moe_path(True)         # same function, half the FFN work


def train_forward(model, x):
    """(inverse depth before the final ReLU (N, H, W), seg logits): the model's forward with the
    last ReLU left out, so pixels predicted below zero still get a gradient (the targets are
    >= 0, so the ReLU the graph applies can only bring the output closer)."""
    _, _, hh, ww = x.shape
    maps = model.features_maps(x)
    conv2 = model.depth_head.scratch.output_conv2
    relu, conv2[3] = conv2[3], torch.nn.Identity()
    try:
        raw = model.depth_head([maps[t] for t in model.depth_taps], hh // 14, ww // 14)
    finally:
        conv2[3] = relu
    return raw.squeeze(1), model.seg_head([maps[t] for t in model.seg_taps], (hh, ww))


def batch_tensors(seeds, size):
    ims, depth, labels = scenes.render_batch(seeds, size, size)
    x = torch.from_numpy(scenes.normalize(ims))
    inv = np.where(depth > 0, 1.0 / np.maximum(depth, 1e-6), 0.0).astype(np.float32)
    return x, torch.from_numpy(inv), torch.from_numpy(labels.astype(np.int64)), depth


class RouterTap:
    """Keeps every block's router logits of the last forward (for the differentiable balance
    loss; MoELoRAFFN's own statistics are detached)."""

    def __init__(self, model):
        self.logits = []
        self.hooks = [m.router.register_forward_hook(lambda mod, a, out: self.logits.append(out))
                      for m in model.moe_blocks]
        self.k = model.top_k

    def balance_loss(self):
        losses = []
        for z in self.logits:
            z = z.reshape(-1, z.shape[-1])
            e = z.shape[-1]
            ids = torch.topk(z.detach(), self.k, dim=-1).indices
            frac = torch.bincount(ids.reshape(-1), minlength=e).float() / ids.numel()
            losses.append(e * (frac * torch.softmax(z, -1).mean(0)).sum())
        self.logits = []
        return torch.stack(losses).mean()


def losses(depth, logits, inv, labels):
    return (depth - inv).abs().mean(), F.cross_entropy(logits, labels)


def cmd_train(args):
    torch.set_num_threads(args.threads)
    os.makedirs(args.dir, exist_ok=True)
    model = make_model(args.seed).train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "pos_embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "pos_embed" not in n)]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.05),
                             dict(params=other, weight_decay=0.0)], lr=args.lr)
    tap = RouterTap(model)
    log = open(os.path.join(args.dir, "train_log.txt"), "w")

    def say(msg):
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    say("vits14-mini: %d parameters, batch %d, %dx%d, %d threads, %.1f min budget"
        % (n_params, args.batch, args.size, args.size, args.threads, args.minutes))
    budget = args.minutes * 60.0
    t0 = time.time()
    step, seen, run = 0, 0, None
    t_render = t_step = 0.0
    while True:
        elapsed = time.time() - t0
        if elapsed >= budget or (args.steps and step >= args.steps):
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(
            math.pi * min(1.0, elapsed / budget)))
        for g in opt.param_groups:
            g["lr"] = lr
        ta = time.time()
        seeds = [TRAIN_SEED0 + args.seed * 10 ** 7 + seen + i for i in range(args.batch)]
        x, inv, labels, _ = batch_tensors(seeds, args.size)
        tb = time.time()
        l_depth, l_seg = losses(*train_forward(model, x), inv, labels)
        l_aux = tap.balance_loss()
        loss = args.depth_weight * l_depth + l_seg + AUX_COEF * l_aux
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tc = time.time()
        t_render += tb - ta
        t_step += tc - tb
        vals = np.array([loss.item(), l_depth.item(), l_seg.item(), l_aux.item()])
        run = vals if run is None else 0.9 * run + 0.1 * vals
        step += 1
        seen += args.batch
        if step % args.log_every == 0 or step == 1:
            say("step %5d  %6.1fs  lr %.2e  loss %.4f  depth L1 %.4f  seg CE %.4f  balance %.3f"
                "  (render %.2fs, train %.2fs per step)"
                % (step, time.time() - t0, lr, run[0], run[1], run[2], run[3],
                   t_render / step, t_step / step))
    for h in tap.hooks:
        h.remove()
    say("done: %d steps, %d images, %.1fs (render %.2fs + train %.2fs per step)"
        % (step, seen, time.time() - t0, t_render / max(step, 1), t_step / max(step, 1)))
    model.eval()
    ck = os.path.join(args.dir, NAME + ".pth")
    torch.save(model.state_dict(), ck)
    say("wrote %s" % ck)
    export(model, args.dir, say)
    write_samples(args.dir, args.samples, say)
    if args.eval_images:
        say(format_report(evaluate(model, args.eval_images, args.size)))
    log.close()
    return 0


def export(model, out_dir, say=print):
    path = os.path.join(out_dir, NAME + ".vkg")
    model.source = NAME + ".pth (tools/train_depth_seg.py)"
    b = depth_seg.export_depth_seg(model, (SIZE, SIZE), fp16=True, class_names=scenes.CLASSES,
                                   path=path, metadata={"depth.kind": DEPTH_KIND})
    say("wrote %s: %d bytes, %d nodes, %d parameters"
        % (path, os.path.getsize(path), len(b.nodes), b.parameter_count()))
    return path


def write_samples(out_dir, n, say=print):
    """images/scene_k.png (RGB) and its ground truth: scene_k_depth.npy (z-depth in m, 0 = sky),
    scene_k_labels.png (class ids), scene_k_input.npy (the graph's input, (1, 3, H, W) f32)."""
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    for k in range(n):
        im, depth, labels = scenes.render(k, SIZE, SIZE)
        base = os.path.join(img_dir, "scene_%d" % k)
        scenes.write_png(base + ".png", im)
        scenes.write_png(base + "_labels.png", labels)
        np.save(base + "_depth.npy", depth)
        np.save(base + "_input.npy", scenes.normalize(im[None]))
    say("wrote %d held-out scenes (seeds 0..%d) to %s" % (n, n - 1, img_dir))


def _score(batches):
    """AbsRel (raw and median-scaled), delta1 and mIoU from (predicted inverse depth (N, H, W),
    predicted labels (N, H, W), ground-truth z-depth (N, H, W), labels (N, H, W)) batches."""
    k = len(scenes.CLASSES)
    inter, union = np.zeros(k), np.zeros(k)
    absrel, absrel_med, d1, count, n = 0.0, 0.0, 0.0, 0, 0
    for pred_inv, pred_lab, depth, lab in batches:
        pred_inv = pred_inv.astype(np.float64)
        for i in range(len(depth)):
            valid = depth[i] > 0
            gt = depth[i][valid].astype(np.float64)
            pd = 1.0 / np.maximum(pred_inv[i][valid], 1e-3)
            absrel += float((np.abs(pd - gt) / gt).sum())
            pm = pd * np.median(gt) / np.median(pd)
            absrel_med += float((np.abs(pm - gt) / gt).sum())
            d1 += float((np.maximum(pd / gt, gt / pd) < 1.25).sum())
            count += int(valid.sum())
        for c in range(k):
            inter[c] += np.sum((pred_lab == c) & (lab == c))
            union[c] += np.sum((pred_lab == c) | (lab == c))
        n += len(depth)
    iou = inter / np.maximum(union, 1)
    return dict(images=n, absrel=absrel / count, absrel_median=absrel_med / count,
                delta1=d1 / count, miou=float(iou[union > 0].mean()), iou=iou)


def evaluate(model, n, size, batch=8):
    """The metrics of _score over held-out seeds 0..n-1, predicted by the PyTorch module."""
    model.eval()

    def batches():
        with torch.no_grad():
            for s in range(0, n, batch):
                x, _, labels, depth = batch_tensors(list(range(s, min(n, s + batch))), size)
                out = model(x)
                yield (out["depth"].numpy(), out["seg_logits"].argmax(1).numpy(), depth,
                       labels.numpy())
    return _score(batches())


def evaluate_vkg(vkg_bin, graph, n, size, batch=16):
    """The same metrics, predicted by the C runtime: `vkg run graph` on the held-out scenes,
    batch images per run (the graph's batch dimension is symbolic)."""
    import subprocess
    import tempfile

    def batches():
        with tempfile.TemporaryDirectory() as tmp:
            for s in range(0, n, batch):
                x, _, labels, depth = batch_tensors(list(range(s, min(n, s + batch))), size)
                inp, out = os.path.join(tmp, "image.npy"), os.path.join(tmp, "out%d" % s)
                np.save(inp, x.numpy())
                r = subprocess.run([vkg_bin, "run", graph, "--input", "image=" + inp, "--out", out],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError("vkg run failed: %s%s" % (r.stdout, r.stderr))
                d = np.load(os.path.join(out, "depth.npy"))
                lg = np.load(os.path.join(out, "seg_logits.npy"))
                yield d, lg.argmax(1), depth, labels.numpy()
    return _score(batches())


def format_report(r):
    return ("eval on %d held-out scenes: AbsRel %.4f (median-scaled %.4f), delta1 %.4f, mIoU %.4f "
            "(%s)" % (r["images"], r["absrel"], r["absrel_median"], r["delta1"], r["miou"],
                      ", ".join("%s %.3f" % (c, v) for c, v in zip(scenes.CLASSES, r["iou"]))))


def load(args):
    ck = args.checkpoint or os.path.join(args.dir, NAME + ".pth")
    return depth_seg.build_model(CONFIG["arch"], ck, **{k: v for k, v in CONFIG.items()
                                                        if k != "arch"})


def cmd_eval(args):
    torch.set_num_threads(args.threads)
    print(format_report(evaluate(load(args), args.eval_images, args.size)))
    return 0


def cmd_eval_vkg(args):
    graph = args.graph or os.path.join(args.dir, NAME + ".vkg")
    r = evaluate_vkg(args.vkg, graph, args.eval_images, args.size)
    print(format_report(r).replace("eval on", "eval by `vkg run` (%s) on" % graph))
    return 0


def cmd_export(args):
    export(load(args), args.dir)
    return 0


def cmd_samples(args):
    os.makedirs(args.dir, exist_ok=True)
    write_samples(args.dir, args.samples)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", nargs="?", default="train",
                   choices=("train", "eval", "eval-vkg", "export", "samples"))
    p.add_argument("--dir", default=DEFAULT_DIR, help="output / input directory")
    p.add_argument("--checkpoint", help="eval/export: the .pth (default DIR/%s.pth)" % NAME)
    p.add_argument("--minutes", type=float, default=25.0, help="training time budget")
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: time)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=SIZE, help="training / eval image side")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--depth-weight", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 2 helps only on an otherwise idle 2-core machine (on a "
                   "busy one, threads waiting for each other make steps several times slower)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--samples", type=int, default=4, help="held-out scenes written")
    p.add_argument("--eval-images", type=int, default=64)
    p.add_argument("--vkg", default=os.path.join(HERE, "..", "build", "release", "tools", "vkg"),
                   help="eval-vkg: the vkg command line program")
    p.add_argument("--graph", help="eval-vkg: the .vkg (default DIR/%s.vkg)" % NAME)
    args = p.parse_args(argv)
    return {"train": cmd_train, "eval": cmd_eval, "eval-vkg": cmd_eval_vkg, "export": cmd_export,
            "samples": cmd_samples}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
