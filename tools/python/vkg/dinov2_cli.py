"""`python3 -m vkg dinov2 CHECKPOINT ...`: the argument parser needs no torch (vkg.dinov2 is
imported when the command runs)."""

import sys

# kept equal to vkg.dinov2.ARCH_NAMES / LAYOUTS (tests check it)
ARCH_NAMES = ["vitb14", "vitb14_reg", "vitg14", "vitg14_reg", "vitl14", "vitl14_reg", "vits14",
              "vits14_reg"]
LAYOUTS = ("official", "timm", "hf")


def add_command(sub):
    p = sub.add_parser(
        "dinov2", help="export a DINOv2 backbone (block outputs) to a .vkg file",
        description="Export a DINOv2 ViT backbone. CHECKPOINT is a .pth/.pt/.bin state dict "
        "(official facebookresearch, timm or Hugging Face layout, auto-detected; wrapped or "
        "prefixed dicts are accepted), a Hugging Face .safetensors file, or random:SEED for "
        "random weights from that seed.")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--arch", default="vits14", choices=ARCH_NAMES,
                   help="model arch (vitg14 has the SwiGLU FFN of the official code)")
    p.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"), default=(518, 518))
    p.add_argument("--taps", default=None,
                   help="comma-separated 1-based block numbers (default: 3,6,9,12 scaled to the "
                   "depth: the last block of each quarter)")
    p.add_argument("--norm", action="store_true", help="apply the final LayerNorm to each tap")
    p.add_argument("--tokens", default="all", choices=("all", "patches", "cls_patches"),
                   help="tokens of each output: all (cls, registers, patches; default), patches "
                   "only, or cls and patches without the registers")
    p.add_argument("--fp16", action="store_true", help="store linear weights as f16")
    p.add_argument("--depth", type=int, default=None, help="override the block count")
    p.add_argument("--layout", default="auto", choices=("auto",) + LAYOUTS)
    p.add_argument("-o", "--output", required=True, help="the .vkg file to write")
    p.set_defaults(func=run_command)


def run_command(args):
    from .dinov2 import build_model, export_dinov2
    try:
        model = build_model(args.arch, args.checkpoint, depth=args.depth, layout=args.layout)
    except (NotImplementedError, ValueError, OSError) as e:
        print("vkg dinov2: %s" % e, file=sys.stderr)
        return 1
    if args.taps:
        try:
            taps = [int(t) for t in args.taps.split(",") if t.strip()]
        except ValueError:
            print("vkg dinov2: --taps %r: give comma-separated integers" % args.taps,
                  file=sys.stderr)
            return 1
    else:
        taps = sorted({max(1, model.depth * q // 4) for q in (1, 2, 3, 4)})
    b = export_dinov2(model, args.image_size, taps, norm=args.norm, fp16=args.fp16, tokens=args.tokens,
                      path=args.output)
    print("wrote %s: dinov2_%s, %d blocks, image %dx%d, outputs %s, %d nodes, %d parameters"
          % (args.output, model.arch, model.depth, args.image_size[0], args.image_size[1],
             ",".join("block%d" % t for t in taps), len(b.nodes), b.parameter_count()))
    return 0
