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


# Each entry adds one subcommand; later model families append their own adder here.
COMMANDS = [add_inspect, add_export_demo, add_dinov2, add_moe_demo]


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
