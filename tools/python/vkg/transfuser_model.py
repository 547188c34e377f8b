"""The Transfuser planning model around the MoE decoder (model-spec §3.2, §3.5): query and
key/value construction, the MoE decoder (vkg.transfuser), the trajectory head and the agent head.

Written from shared/docs/model-spec.md (navsim's `transfuser_model.py` names; no code copied).

- `TransfuserMoE(config)`: `forward(bev_feature (B, 512, 8, 8), status_feature (B, 8))` returns
  an OrderedDict: trajectory (B, 8, 3), agent_states (B, 30, 5), agent_labels (B, 30) and the
  decoder's five routing statistics. The backbone that makes bev_feature (ResNet34 image + LiDAR
  fusion) is out of scope. state_dict names are navsim's: `_bev_downscale` (Conv1x1 512->256),
  `_status_encoding` (Linear 8->256), `_keyval_embedding` (Embedding 65), `_query_embedding`
  (Embedding 31), `_tf_decoder.layers.{i}...` (vkg.transfuser's MoE decoder layout),
  `_trajectory_head._mlp.{0,2}`, `_agent_head._mlp_states.{0,2}`, `_agent_head._mlp_label.0`.
- `export_transfuser_model(model, path, fp16)`: the whole model as one graph; inputs
  `bev_feature`, `status_feature`; outputs trajectory, agent_states, agent_labels and the five
  statistics (AUX_NAMES).
- `python3 -m vkg transfuser-model`: checkpoints or `--random SEED` (the sample's bundled graph:
  samples/transfuser_moe).

How the graph builds what navsim computes with broadcasting: the BEV map (B, 512, 8, 8) becomes
64 tokens by reshape + permute and the 1x1 conv as a linear; the status token is appended with
insert_tokens; the keyval embedding is a broadcast add. The query is the (31, 256) embedding for
every batch element: the graph puts it in front of the keyval tokens with insert_tokens (which
broadcasts a batch-1 tensor) and slices it back out, two small copies. The heads' tanh scalings
act on column slices that concat joins again, so every column is computed exactly as in PyTorch.
"""

from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn

from . import moe
from . import transfuser as tf
from .builder import Builder
from .errors import ExportError

PI = float(np.float32(np.pi))   # navsim multiplies by numpy.pi in fp32


class TrajectoryHead(nn.Module):
    """Linear(D -> ffn) -> ReLU -> Linear(ffn -> 3 * poses) on the trajectory query (B, 1, D);
    (B, poses, 3) with heading = tanh(.) * pi."""

    def __init__(self, num_poses=8, d_ffn=1024, d_model=256):
        super().__init__()
        self._num_poses = num_poses
        self._mlp = nn.Sequential(nn.Linear(d_model, d_ffn), nn.ReLU(),
                                  nn.Linear(d_ffn, num_poses * 3))

    def forward(self, q):
        poses = self._mlp(q).reshape(-1, self._num_poses, 3)
        return torch.cat([poses[..., :2], poses[..., 2:3].tanh() * PI], dim=-1)


class AgentHead(nn.Module):
    """States: Linear -> ReLU -> Linear(ffn -> 5) with x, y = tanh * 32 and heading = tanh * pi
    (length, width raw); labels: Linear(D -> 1) squeezed."""

    def __init__(self, num_agents=30, d_ffn=1024, d_model=256):
        super().__init__()
        self._num_agents = num_agents
        self._mlp_states = nn.Sequential(nn.Linear(d_model, d_ffn), nn.ReLU(),
                                         nn.Linear(d_ffn, 5))
        self._mlp_label = nn.Sequential(nn.Linear(d_model, 1))

    def forward(self, q):
        s = self._mlp_states(q)
        states = torch.cat([s[..., 0:2].tanh() * 32.0, s[..., 2:3].tanh() * PI, s[..., 3:5]],
                           dim=-1)
        return states, self._mlp_label(q).squeeze(-1)


class TransfuserMoE(nn.Module):
    """navsim's TransfuserModel after the backbone, with vkg.transfuser's MoE decoder."""

    def __init__(self, d_model=256, heads=8, d_ffn=1024, layers=3, config=None, bev_channels=512,
                 bev_size=8, status_dim=8, num_poses=8, num_agents=30):
        super().__init__()
        self.config = tf.MoEConfig() if config is None else config
        self.bev_size, self.num_poses, self.num_agents = bev_size, num_poses, num_agents
        self._bev_downscale = nn.Conv2d(bev_channels, d_model, kernel_size=1)
        self._status_encoding = nn.Linear(status_dim, d_model)
        self._keyval_embedding = nn.Embedding(bev_size * bev_size + 1, d_model)
        self._query_embedding = nn.Embedding(1 + num_agents, d_model)
        self._tf_decoder = tf.MoETransformerDecoder(d_model, heads, d_ffn, layers, self.config)
        self._trajectory_head = TrajectoryHead(num_poses, d_ffn, d_model)
        self._agent_head = AgentHead(num_agents, d_ffn, d_model)

    def forward(self, bev_feature, status_feature):
        b = bev_feature.shape[0]
        bev = self._bev_downscale(bev_feature).flatten(-2, -1).permute(0, 2, 1)
        status = self._status_encoding(status_feature)
        keyval = torch.cat([bev, status[:, None]], dim=1) + self._keyval_embedding.weight[None]
        query = self._query_embedding.weight[None].repeat(b, 1, 1)
        out, aux = self._tf_decoder(query, keyval)
        trajectory = self._trajectory_head(out[:, :1])
        states, labels = self._agent_head(out[:, 1:])
        res = OrderedDict(trajectory=trajectory, agent_states=states, agent_labels=labels)
        res.update(aux)
        return res


def init_random(model, seed=0):
    """Random weights from seed: the decoder as vkg.transfuser.init_random (every layer
    different), the rest U(-1/sqrt(fan_in), 1/sqrt(fan_in)) and embeddings N(0, 1), drawn in
    named_parameters order from one generator. Returns model."""
    g = torch.Generator().manual_seed(int(seed))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if name.startswith("_tf_decoder."):
                continue
            if "embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                # a bias takes its layer's weight's fan-in
                w = params[name[:-len("bias")] + "weight"] if p.dim() == 1 else p
                fan_in = int(np.prod(w.shape[1:]))
                a = fan_in ** -0.5
                p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1) * a)
    tf.init_random(model._tf_decoder, int(seed) + 1)
    return model


HEAD_F16 = ("_mlp.0.weight", "_mlp_states.0.weight")


def round_weights_f16(model):
    """Rounds what fp16=True stores as f16 (the decoder's matrices, the heads' hidden layers'
    matrices) to f16 and back, in place. Returns model."""
    tf.round_weights_f16(model._tf_decoder)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(HEAD_F16):
                p.copy_(p.half().float())
    return model


def _np(t):
    return t.detach().cpu().numpy().astype(np.float32)


def export_transfuser_model(model, path=None, fp16=False, metadata=None):
    """The graph of a TransfuserMoE (batch symbolic). fp16: the decoder's and the heads'
    hidden matrices as f16. Returns the Builder (saved when path is given)."""
    from . import __version__
    if not isinstance(model, TransfuserMoE):
        raise ExportError("export_transfuser_model: expected a TransfuserMoE, got %s"
                          % type(model).__name__)
    conv = model._bev_downscale
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.padding != (0, 0) \
            or conv.groups != 1 or conv.bias is None:
        raise ExportError("_bev_downscale must be a 1x1 Conv2d with bias")
    d, cb, s = conv.out_channels, conv.in_channels, model.bev_size
    nq = model._query_embedding.num_embeddings
    wdt = "f16" if fp16 else "f32"
    b = Builder()
    bev_in = b.input("bev_feature", ["batch", cb, s, s])
    status_in = b.input("status_feature", ["batch", model._status_encoding.in_features])

    def const(name, t, dtype="f32"):
        return moe._const(b, name, _np(t) if isinstance(t, torch.Tensor) else t, dtype)

    # keyval (B, 65, D): BEV tokens, the status token, the learned embedding
    bev = b.reshape(bev_in, [0, cb, s * s], name="bev_flatten")
    bev = b.permute(bev, [0, 2, 1], name="bev_tokens")
    bev = b.linear(bev, const("_bev_downscale.weight", conv.weight.reshape(d, cb)),
                   const("_bev_downscale.bias", conv.bias), name="_bev_downscale")
    se = model._status_encoding
    st = b.linear(status_in, const("_status_encoding.weight", se.weight),
                  const("_status_encoding.bias", se.bias), name="_status_encoding")
    st = b.reshape(st, [0, 1, d], name="status_token")
    kv = b.insert_tokens(bev, st, s * s, name="keyval_tokens")
    kv = b.add(kv, const("_keyval_embedding.weight", model._keyval_embedding.weight[None]),
               name="keyval")
    # the query: the (1, Q, D) embedding put in front of keyval (broadcast over the batch), cut out
    qe = const("_query_embedding.weight", model._query_embedding.weight[None])
    q = b.insert_tokens(kv, qe, 0, name="query_broadcast")
    q = b.slice(q, 1, 0, nq, name="query")

    out, stats = tf.convert_decoder(b, model._tf_decoder, q, kv, path="_tf_decoder", fp16=fp16)

    def mlp_hidden(x, seq, pre):
        return b.linear(x, const(pre + ".0.weight", seq[0].weight, wdt),
                        const(pre + ".0.bias", seq[0].bias), activation=1, name=pre + ".0")

    def scaled_tanh(x, lo, hi, k, name):
        t = b.tanh(b.slice(x, 2, lo, hi, name=name + ".cols"), name=name + ".tanh")
        return b.mul(t, const(name + ".scale", np.array([k], dtype=np.float32)), name=name)

    th = model._trajectory_head
    h = mlp_hidden(b.slice(out, 1, 0, 1, name="trajectory_query"), th._mlp,
                   "_trajectory_head._mlp")
    p = b.linear(h, const("_trajectory_head._mlp.2.weight", th._mlp[2].weight),
                 const("_trajectory_head._mlp.2.bias", th._mlp[2].bias),
                 name="_trajectory_head._mlp.2")
    p = b.reshape(p, [0, model.num_poses, 3], name="poses")
    traj = b.concat([b.slice(p, 2, 0, 2, name="poses.xy"),
                     scaled_tanh(p, 2, 3, PI, "poses.heading")], 2, name="trajectory")

    ah = model._agent_head
    aq = b.slice(out, 1, 1, nq, name="agents_query")
    h = mlp_hidden(aq, ah._mlp_states, "_agent_head._mlp_states")
    a = b.linear(h, const("_agent_head._mlp_states.2.weight", ah._mlp_states[2].weight),
                 const("_agent_head._mlp_states.2.bias", ah._mlp_states[2].bias),
                 name="_agent_head._mlp_states.2")
    states = b.concat([scaled_tanh(a, 0, 2, 32.0, "agents.point"),
                       scaled_tanh(a, 2, 3, PI, "agents.heading"),
                       b.slice(a, 2, 3, 5, name="agents.box")], 2, name="agent_states")
    lab = ah._mlp_label[0]
    labels = b.linear(aq, const("_agent_head._mlp_label.0.weight", lab.weight),
                      const("_agent_head._mlp_label.0.bias", lab.bias),
                      name="_agent_head._mlp_label.0")
    labels = b.reshape(labels, [0, model.num_agents], name="agent_labels")

    b.output(traj, "trajectory")
    b.output(states, "agent_states")
    b.output(labels, "agent_labels")
    for name in tf.AUX_NAMES:
        b.output(stats[name], name)
    cfg = tf.model_config(model._tf_decoder)
    b.metadata("producer", "vkg.export %s" % __version__)
    b.metadata("model_name", "TransfuserMoE")
    b.metadata("exporter_version", __version__)
    for k, v in cfg.items():
        if k != "kind":
            b.metadata("decoder.%s" % k, v)
    b.metadata("weights", "f16" if fp16 else "f32")
    for k, v in (metadata or {}).items():
        b.metadata(k, v)
    if path is not None:
        b.save(path)
    return b


def build_model(checkpoint=None, seed=None):
    """A TransfuserMoE (navsim sizes, E 4, top-2) from a state_dict checkpoint (navsim names)
    or random from seed."""
    if (checkpoint is None) == (seed is None):
        raise ValueError("build_model: give a checkpoint or a seed (not both)")
    model = TransfuserMoE()
    if checkpoint is None:
        return init_random(model, seed).eval()
    from .dinov2 import read_checkpoint
    try:
        sd = read_checkpoint(checkpoint)
    except ExportError as e:
        raise tf.CheckpointError(str(e)) from e
    sd = OrderedDict((k, v if torch.is_tensor(v) else torch.as_tensor(v)) for k, v in sd.items())
    missing, unexpected = tf._load(model, sd)
    if missing or unexpected:
        raise tf.CheckpointError("the checkpoint does not fit TransfuserMoE: missing %s; "
                                 "unexpected %s" % (tf._few(missing), tf._few(unexpected)))
    return model.eval()


def run_export(args):
    """`python3 -m vkg transfuser-model` (the parser is in vkg/__main__.py)."""
    import pickle
    import sys
    if (args.checkpoint is None) == (args.random is None):
        print("vkg transfuser-model: give a CHECKPOINT or --random SEED (one of them)",
              file=sys.stderr)
        return 2
    try:
        model = build_model(args.checkpoint, args.random)
    except (ValueError, OSError, RuntimeError, pickle.UnpicklingError) as e:
        print("vkg transfuser-model: %s" % e, file=sys.stderr)
        return 1
    src = ("random weights, seed %d" % args.random) if args.checkpoint is None \
        else args.checkpoint
    b = export_transfuser_model(model, args.output, fp16=args.fp16,
                                metadata={"description": "Transfuser MoE model (%s)" % src})
    print("wrote %s: TransfuserMoE (%s), %d nodes, %d parameters, %s weights"
          % (args.output, src, len(b.nodes), b.parameter_count(),
             "f16" if args.fp16 else "f32"))
    return 0
