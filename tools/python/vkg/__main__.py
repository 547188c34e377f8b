"""python3 -m vkg: inspect .vkg files and export demo models.

Subcommands are argparse subparsers registered in COMMANDS; model families add theirs there.
"""

import argparse
import sys
from collections import Counter


def _fmt_shape(t):
    return "(" + ", ".join(str(s) if s != "" else "?" for s in t.shape) + ")"


def cmd_inspect(args):
    from .format import DTYPE_SIZE, FormatError, read_graph
    try:
        g = read_graph(args.file)
    except (OSError, FormatError) as e:
        print("vkg inspect: %s: %s" % (args.file, e), file=sys.stderr)
        return 1
    print("%s: vkg %d.%d, %d bytes, %d sections" % (args.file, g.version[0], g.version[1],
                                                    g.file_size, len(g.sections)))
    print("inputs:")
    for i in g.inputs:
        t = g.tensors[i]
        print("  %-24s %-5s %s" % (t.name, t.dtype, _fmt_shape(t)))
    print("outputs:")
    for i in g.outputs:
        t = g.tensors[i]
        print("  %-24s %-5s %s" % (t.name, t.dtype, _fmt_shape(t)))
    ops = Counter(n.op for n in g.nodes)
    print("nodes: %d (%s)" % (len(g.nodes), ", ".join("%s %d" % kv for kv in sorted(ops.items()))))
    consts = [t for t in g.tensors if t.role == "constant"]
    n_params = sum(int(t.data.size) for t in consts)
    n_bytes = sum(t.data_size for t in consts)
    by_dtype = Counter()
    for t in consts:
        by_dtype[t.dtype] += t.data_size // DTYPE_SIZE[t.dtype]
    print("parameters: %d in %d constants, %d bytes (%s)"
          % (n_params, len(consts), n_bytes, ", ".join("%s %d" % kv for kv in sorted(
              by_dtype.items()))))
    if g.metadata:
        print("metadata:")
        for k, v in g.metadata.items():
            print("  %s = %s" % (k, v))
    if args.verbose:
        print("nodes (topological order):")
        for n in g.topo_order():
            ins = ", ".join("-" if i is None else g.tensors[i].name for i in n.inputs)
            outs = ", ".join("%s%s" % (g.tensors[i].name, _fmt_shape(g.tensors[i]))
                             for i in n.outputs)
            attrs = " ".join("%s=%r" % kv for kv in n.attrs.items())
            print("  %-10s %-28s %s -> %s %s" % (n.op, n.name, ins, outs, attrs))
    return 0


def cmd_export_demo(args):
    from . import demos
    from .export import export
    module, x = demos.make(args.kind, seed=args.seed)
    b = export(module, (x,), args.output, dynamic_batch=not args.static_batch,
               metadata={"description": "vkg demo %s (seed %d)" % (args.kind, args.seed)})
    print("wrote %s: %d nodes, %d parameters" % (args.output, len(b.nodes), b.parameter_count()))
    return 0


def add_inspect(sub):
    p = sub.add_parser("inspect", help="print a .vkg file's inputs, outputs, ops, parameters")
    p.add_argument("file")
    p.add_argument("-v", "--verbose", action="store_true", help="also list every node")
    p.set_defaults(func=cmd_inspect)


def add_export_demo(sub):
    p = sub.add_parser("export-demo", help="export a small demo model (fixed seed)")
    p.add_argument("kind", choices=("mlp", "resblock", "transformer"))
    p.add_argument("-o", "--output", required=True, help="the .vkg file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--static-batch", action="store_true",
                   help="fix the batch size to the example's instead of the symbol 'batch'")
    p.set_defaults(func=cmd_export_demo)


def cmd_moe_demo(args):
    from . import moe
    from .export import export
    module, x = moe.demo(args.kind, size=args.size, seed=args.seed)
    if args.variant:
        module.vkg_variant = args.variant
    b = export(module, (x,), args.output, fp16=args.fp16, moe_stats=args.stats,
               moe_routing=args.routing,
               metadata={"description": "vkg MoE demo %s (%s, seed %d)"
                                        % (args.kind, args.size, args.seed)})
    print("wrote %s: %s, %d nodes, %d parameters, example input x %s"
          % (args.output, type(module).__name__, len(b.nodes), b.parameter_count(),
             list(x.shape)))
    return 0


def add_moe_demo(sub):
    p = sub.add_parser("moe-demo", help="export a random MoE FFN (vkg.moe; fixed seed)")
    p.add_argument("kind", choices=("lora", "deepseek", "deepseek-swiglu", "ffn"))
    p.add_argument("-o", "--output", required=True, help="the .vkg file to write")
    p.add_argument("--size", choices=("small", "spec"), default="small",
                   help="small test sizes or the model-spec sizes (S1 / S2 / S3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp16", action="store_true", help="f16 expert and FFN weights")
    p.add_argument("--stats", action="store_true", help="routing statistics as graph outputs")
    p.add_argument("--routing", action="store_true", help="ids and gates as graph outputs")
    p.add_argument("--variant", choices=("shared_base", "naive"),
                   help="MoE-LoRA graph form (default shared_base)")
    p.set_defaults(func=cmd_moe_demo)


def add_dinov2(sub):
    from .dinov2_cli import add_command     # no torch import until the command runs
    add_command(sub)


def add_upcycle(sub):
    p = sub.add_parser(
        "upcycle", help="slice a dense ViT's FFNs into DeepSeek-MoE experts (safetensors out)",
        description="Upcycle every dense FFN of a ViT state dict (timm / DINOv2 / Hugging Face "
        "Dinov2 names, DINOv2's packed SwiGLU, or vkg.models.DeepSeekViT's dense form; "
        ".safetensors or torch .pt/.pth) into DeepSeek-MoE experts (model-spec 2.4): expert e "
        "takes fc1 rows perm[e*w:(e+1)*w] and the same fc2 columns, the first S experts form the "
        "shared MLP, which keeps fc2's bias. Other tensors are copied.")
    p.add_argument("checkpoint", metavar="DENSE_CHECKPOINT")
    p.add_argument("--experts", type=int, required=True, help="E: fine-grained experts per FFN")
    p.add_argument("--shared", type=int, required=True, help="S: always-on shared experts")
    p.add_argument("--permutation", metavar="FILE.npy",
                   help="integer permutation of the H hidden neurons: (H,) or (blocks, H)")
    p.add_argument("--router-init", choices=("zeros", "normal"), default="zeros",
                   help="zeros (uniform scores, ties to the lowest routed experts) or N(0, std^2)")
    p.add_argument("--router-std", type=float, default=None,
                   help="std of --router-init normal (default 1/sqrt(D))")
    p.add_argument("--router-cols", choices=("all", "routed"), default="all",
                   help="router columns over all E experts (paper) or the E-S routed ones")
    p.add_argument("--seed", type=int, default=0, help="seed of --router-init normal")
    p.add_argument("-o", "--output", required=True, help="the .safetensors file to write")

    def run(args):
        from .deepseek_vit import run_upcycle
        return run_upcycle(args)
    p.set_defaults(func=run)


def add_deepseek_vit(sub):
    p = sub.add_parser(
        "deepseek-vit", help="export a DeepSeek-MoE ViT encoder (vkg.models.DeepSeekViT)",
        description="Export a pre-norm ViT whose FFNs are DeepSeek-MoE layers. CHECKPOINT: a "
        "MoE state dict (python3 -m vkg upcycle writes one), a dense ViT state dict (upcycled "
        "on load with zero routers), or random:SEED. Graph input image (batch, 3, H, W); output "
        "`output` = the final-normed tokens, and block<i> per tap.")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--dim", type=int, required=True, help="D (ViT-H: 1280)")
    p.add_argument("--depth", type=int, required=True, help="blocks L (ViT-H: 32)")
    p.add_argument("--heads", type=int, required=True, help="attention heads (ViT-H: 16)")
    p.add_argument("--patch", type=int, required=True, help="patch size P (ViT-H/14: 14)")
    p.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"), required=True)
    p.add_argument("--experts", type=int, required=True, help="E (spec: 128)")
    p.add_argument("--shared", type=int, required=True, help="S (spec: 4)")
    p.add_argument("--top-k", type=int, required=True, help="M routed experts per token (4)")
    p.add_argument("--score", choices=("softmax", "sigmoid"), default="softmax")
    p.add_argument("--router-cols", choices=("all", "routed"), default=None,
                   help="router over all E columns (default) or the E-S routed ones "
                   "(default: what the checkpoint has)")
    p.add_argument("--renorm", action="store_true", help="divide the gates by their sum")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the gates")
    p.add_argument("--activation", choices=("gelu", "swiglu"), default=None,
                   help="expert FFN (default: what the checkpoint has, else gelu)")
    p.add_argument("--width", type=int, default=None, help="expert width w (default H / E)")
    p.add_argument("--hidden", type=int, default=None,
                   help="dense FFN width H (default E * w, or 4 D)")
    p.add_argument("--ffn", choices=("moe", "dense"), default="moe",
                   help="dense: export the dense encoder instead (benchmark baseline)")
    p.add_argument("--layerscale", action="store_true",
                   help="LayerScale (random weights; checkpoints: detected)")
    p.add_argument("--pos-grid", type=int, default=None,
                   help="random weights: positional table M x M (default 224 / P)")
    p.add_argument("--interpolate-offset", type=float, default=None,
                   help="DINOv2 pos-embed resampling offset (default 0.1)")
    p.add_argument("--interpolate-antialias", action="store_true",
                   help="antialiased resampling (DINOv2 _reg convention)")
    p.add_argument("--taps", default=None, help="comma-separated 1-based blocks to output")
    p.add_argument("--stats", action="store_true", help="routing statistics as outputs")
    p.add_argument("--routing", action="store_true", help="ids and gates as outputs")
    p.add_argument("--fp16", action="store_true", help="store matrices as f16 (routers f32)")
    p.add_argument("-o", "--output", required=True, help="the .vkg file to write")

    def run(args):
        from .deepseek_vit import run_export
        return run_export(args)
    p.set_defaults(func=run)


# Each entry adds one subcommand; later model families append their own adder here.
COMMANDS = [add_inspect, add_export_demo, add_dinov2, add_moe_demo, add_upcycle, add_deepseek_vit]


def add_transfuser_decoder(sub):
    p = sub.add_parser(
        "transfuser-decoder", help="export the Transfuser MoE decoder (vkg.transfuser)",
        description="Export a MoETransformerDecoder (model-spec S3; state_dict layers.{i}."
        "self_attn|multihead_attn|norm1-3|moe.router|moe.experts.{e}.fc1/fc2) or a plain "
        "nn.TransformerDecoder (layers.{i}.linear1/linear2; or --dense). CHECKPOINT: a torch "
        ".pt/.pth state dict or .safetensors (a prefix such as _tf_decoder. is removed); or "
        "--random SEED. Inputs tgt (batch, Q, D), memory (batch, S, D); outputs output and "
        "moe_aux_loss, moe_router_z_loss, moe_load_balance_loss, moe_usage_counts, "
        "moe_usage_fraction. Sizes left out come from the checkpoint, else navsim's.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?")
    p.add_argument("--random", type=int, metavar="SEED", help="random weights from SEED")
    p.add_argument("--dense", action="store_true", help="plain nn.TransformerDecoder (FFN)")
    p.add_argument("--prefix", help="the decoder's key prefix in CHECKPOINT (e.g. _tf_decoder.)")
    p.add_argument("--d-model", type=int, help="D (256)")
    p.add_argument("--heads", type=int, help="attention heads (8)")
    p.add_argument("--ffn", type=int, help="FFN / expert hidden width (1024)")
    p.add_argument("--layers", type=int, help="decoder layers (3)")
    p.add_argument("--experts", type=int, help="E (4)")
    p.add_argument("--top-k", type=int, help="k experts per token (2)")
    p.add_argument("--activation", choices=("relu", "gelu"), help="expert / FFN act (relu)")
    p.add_argument("--temperature", type=float, help="router temperature (1.0)")
    p.add_argument("--load-balance-coef", type=float, help="(0.01)")
    p.add_argument("--z-loss-coef", type=float, help="router z-loss coefficient (0.001)")
    p.add_argument("--queries", type=int, default=31, help="Q query tokens (31)")
    p.add_argument("--memory", type=int, default=65, help="S memory tokens (65)")
    p.add_argument("--fp16", action="store_true", help="f16 matrices (routers, norms f32)")
    p.add_argument("--layer-stats", action="store_true",
                   help="also output each layer's router statistics")
    p.add_argument("-o", "--output", required=True, help="the .vkg file to write")

    def run(args):
        from .transfuser import run_export
        return run_export(args)
    p.set_defaults(func=run)


COMMANDS.append(add_transfuser_decoder)


def add_transfuser_model(sub):
    p = sub.add_parser(
        "transfuser-model", help="export the Transfuser model with the MoE decoder and heads",
        description="Export vkg.transfuser_model.TransfuserMoE (model-spec S3 §3.2-3.5): "
        "keyval from bev_feature (batch, 512, 8, 8) and status_feature (batch, 8), the "
        "31 learned queries, the 3-layer MoE decoder (E 4, top-2), the trajectory head and "
        "the agent head. Outputs trajectory (batch, 8, 3), agent_states (batch, 30, 5), "
        "agent_labels (batch, 30) and the five routing statistics. CHECKPOINT: a state dict "
        "with navsim's names (_bev_downscale, _status_encoding, _keyval_embedding, "
        "_query_embedding, _tf_decoder.layers.{i}..., _trajectory_head._mlp, "
        "_agent_head._mlp_states, _agent_head._mlp_label); or --random SEED.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?")
    p.add_argument("--random", type=int, metavar="SEED", help="random weights from SEED")
    p.add_argument("--fp16", action="store_true",
                   help="f16 matrices in the decoder and the heads' hidden layers")
    p.add_argument("-o", "--output", required=True, help="the .vkg file to write")

    def run(args):
        from .transfuser_model import run_export
        return run_export(args)
    p.set_defaults(func=run)


COMMANDS.append(add_transfuser_model)


def add_depth_seg(sub):
    p = sub.add_parser(
        "depth-seg", help="export DINOv2 + MoE-LoRA + DPT depth + BN seg heads (vkg.depth_seg)",
        description="Export the whole S1 model of model-spec 1: a DINOv2 backbone whose every "
        "FFN is MoE-LoRA, Depth Anything V2's DPT head (blocks 3/6/9/12) and DINOv2's BN seg head "
        "(blocks 9-12). CHECKPOINT: a .pth/.pt state dict or .safetensors with pretrained.* "
        "(DINOv2 official names; pretrained.blocks.i.mlp.fc1|fc2 = the frozen base, "
        "mlp.router, mlp.experts.e.fc1|fc2.lora_A|lora_B.weight in PEFT's orientation), "
        "depth_head.* (Depth Anything V2 names), seg_head.bn.*, seg_head.conv_seg.*; or "
        "random:SEED / --random-init SEED. Graph input image (batch, 3, H, W), normalized RGB "
        "(mean 0.485 0.456 0.406, std 0.229 0.224 0.225); outputs depth (batch, H, W), "
        "seg_logits (batch, C, H, W). --experts, --lora-rank and --classes default to the "
        "checkpoint's; --top-k and --lora-alpha cannot be read from weights (defaults 2 and 8).")
    p.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?")
    p.add_argument("--arch", default="vits14",
                   choices=["vitb14", "vitb14_reg", "vitl14", "vitl14_reg", "vits14",
                            "vits14-mini", "vits14_reg"],
                   help="backbone and DPT widths (vits14-mini: the bundled reduced model, D 96, "
                   "12 blocks, 3 heads, DPT features 32, out channels 24/48/96/96)")
    p.add_argument("--experts", type=int, default=None, help="E (8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (2)")
    p.add_argument("--lora-rank", type=int, default=None, help="r (8)")
    p.add_argument("--lora-alpha", type=float, default=8.0, help="alpha; LoRA scale alpha / r")
    p.add_argument("--classes", type=int, default=None, help="C (required with random weights)")
    p.add_argument("--seg-head", choices=("pyramid", "flat"), default="pyramid",
                   help="resize factors 4/2/1/0.5 before the concat (pyramid) or none (flat)")
    p.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"), default=(518, 518))
    p.add_argument("--routing-stats", action="store_true",
                   help="also output blocks.<i>.mlp.counts (per-expert usage counts), fraction, "
                   "mean_score, load_balance, z_loss for every block")
    p.add_argument("--labels", action="store_true", help="also output seg_labels (argmax)")
    p.add_argument("--class-names", metavar="A,B,...",
                   help="C comma-separated class names (metadata seg.classes)")
    p.add_argument("--fp16", action="store_true",
                   help="store matrices and conv kernels as f16 (routers, norms, biases f32)")
    p.add_argument("--variant", choices=("shared_base", "naive"), default=None,
                   help="MoE-LoRA graph form (default shared_base)")
    p.add_argument("--random-init", type=int, metavar="SEED", default=None,
                   help="random weights from SEED instead of a checkpoint (testing)")
    p.add_argument("--partial", action="store_true",
                   help="keep keys the checkpoint lacks at their initial values (e.g. a Depth "
                   "Anything V2 checkpoint: zero LoRA B, so each FFN is the dense one)")
    p.add_argument("-o", "--output", required=True, help="the .vkg file to write")

    def run(args):
        from .depth_seg import run_export
        return run_export(args)
    p.set_defaults(func=run)


COMMANDS.append(add_depth_seg)


def build_parser():
    parser = argparse.ArgumentParser(prog="python3 -m vkg",
                                     description="vkg graph tools: inspect and export .vkg files")
    parser.add_argument("--version", action="version", version="vkg " + _version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _version():
    from . import __version__
    return __version__


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .errors import ExportError
    try:
        return args.func(args)
    except ExportError as e:
        print("vkg: export failed: %s" % e, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
