"""Procedural scenes with exact depth and labels (NumPy only), and a small PNG writer/reader.

`render(seed, height, width)` ray-casts one pinhole view of a random scene: a ground plane, up to
three walls (back, left, right; finite height, so sky shows above them), axis-aligned boxes turned
about the vertical axis and spheres, all resting on the ground; sky where a ray hits nothing. A
sun (random direction and colour) lights every surface with Lambert + ambient and casts shadows
from the boxes and spheres; every surface gets a procedural texture (checker, stripes or value
noise between two random colours). Deterministic by seed (NumPy's default_rng).

Returns image (H, W, 3) uint8 (sRGB), depth (H, W) float32 and labels (H, W) uint8:
- depth is the exact z-depth of each pixel centre's first hit in metres, i.e. the distance along
  the camera's optical axis (not along the ray); sky pixels are 0 (no depth; mask with depth > 0).
- labels: CLASSES = sky 0, ground 1, wall 2, box 3, sphere 4.
Camera: horizontal field of view FOV_DEG (60 degrees) for every size, height 1.0-2.2 m above the
ground, small random yaw and a downward pitch of 0-17 degrees; square pixels.

`write_png(path, array)` writes uint8 gray (H, W), RGB (H, W, 3) or uint16 gray; `read_png(path)`
reads 8/16-bit gray, RGB and RGBA non-interlaced PNGs (all five filter types).
"""

import struct
import zlib

import numpy as np

CLASSES = ("sky", "ground", "wall", "box", "sphere")
PALETTE = np.array([[135, 190, 235], [120, 100, 70], [200, 200, 190], [220, 60, 50],
                    [60, 120, 220]], np.uint8)
FOV_DEG = 60.0
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
_EPS = 1e-4
_FAR = np.float64(1e9)


class _Noise:
    """2-D value noise: a random lattice, smoothly interpolated, three octaves."""

    def __init__(self, rng, n=64):
        self.n = n
        self.table = rng.random((n, n))

    def __call__(self, u, v):
        out = np.zeros_like(u)
        amp, total = 1.0, 0.0
        for octave in range(3):
            f = 2.0 ** octave
            x, y = u * f, v * f
            x0, y0 = np.floor(x), np.floor(y)
            tx, ty = x - x0, y - y0
            tx, ty = tx * tx * (3 - 2 * tx), ty * ty * (3 - 2 * ty)
            i0, j0 = x0.astype(np.int64) % self.n, y0.astype(np.int64) % self.n
            i1, j1 = (i0 + 1) % self.n, (j0 + 1) % self.n
            t = self.table
            a = t[i0, j0] * (1 - tx) + t[i1, j0] * tx
            c = t[i0, j1] * (1 - tx) + t[i1, j1] * tx
            out += amp * (a * (1 - ty) + c * ty)
            total += amp
            amp *= 0.5
        return out / total


def _material(rng):
    """(kind, colour 1, colour 2, scale) of a random procedural texture."""
    kind = rng.choice(["checker", "stripes", "noise", "plain"], p=[0.35, 0.25, 0.3, 0.1])
    c1 = rng.uniform(0.08, 0.95, 3)
    c2 = np.clip(c1 * rng.uniform(0.3, 0.8) + rng.uniform(-0.15, 0.15, 3), 0.02, 1.0)
    return kind, c1, c2, rng.uniform(0.25, 1.5)


def _texture(mat, u, v, noise):
    kind, c1, c2, s = mat
    if kind == "checker":
        m = (np.floor(u / s) + np.floor(v / s)) % 2
    elif kind == "stripes":
        m = np.floor((u + 0.5 * v) / s) % 2
    elif kind == "noise":
        m = noise(u / s + 17.3, v / s - 4.1)
    else:
        m = np.zeros_like(u)
    return c1[None, :] * (1 - m[:, None]) + c2[None, :] * m[:, None]


def _camera(rng, height, width):
    cam_h = rng.uniform(1.0, 2.2)
    yaw = rng.uniform(-0.35, 0.35)
    pitch = -rng.uniform(0.0, 0.3)
    f = np.array([np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)])
    r = np.array([np.cos(yaw), 0.0, -np.sin(yaw)])
    u = np.cross(f, r)
    fpx = (width / 2.0) / np.tan(np.radians(FOV_DEG) / 2)
    jj, ii = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    xc = ((jj - width / 2.0) / fpx).reshape(-1)
    yc = (-(ii - height / 2.0) / fpx).reshape(-1)
    # unnormalized directions with a unit component along the optical axis: the ray parameter
    # t of a hit is its z-depth
    d = xc[:, None] * r[None] + yc[:, None] * u[None] + f[None]
    return np.array([0.0, cam_h, 0.0]), d, f


def _hit_box(o, d, box):
    """Ray parameters and outward normals (world) of the first hit with a box turned by yaw."""
    cx, cz, hx, hy, hz, yaw = box
    c, s = np.cos(yaw), np.sin(yaw)
    # into the box frame (rotation by -yaw about y, centre at the origin)
    ox, oy, oz = o[..., 0] - cx, o[..., 1] - hy, o[..., 2] - cz
    lo_x, lo_z = c * ox - s * oz, s * ox + c * oz
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    ld_x, ld_z = c * dx - s * dz, s * dx + c * dz
    lo = np.stack(np.broadcast_arrays(lo_x, oy, lo_z), -1)
    ld = np.stack([ld_x, dy, ld_z], -1)
    half = np.array([hx, hy, hz])
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / np.where(np.abs(ld) < 1e-12, 1e-12, ld)
        t1, t2 = (-half - lo) * inv, (half - lo) * inv
    tmin, tmax = np.minimum(t1, t2), np.maximum(t1, t2)
    tn, tf = tmin.max(-1), tmax.min(-1)
    axis = tmin.argmax(-1)
    hit = (tn <= tf) & (tn > _EPS)
    t = np.where(hit, tn, _FAR)
    sign = -np.sign(np.take_along_axis(ld, axis[:, None], -1)[:, 0])
    nl = np.zeros(ld.shape)
    nl[np.arange(len(axis)), axis] = sign
    # back to world: rotation by +yaw
    n = np.stack([c * nl[:, 0] + s * nl[:, 2], nl[:, 1], -s * nl[:, 0] + c * nl[:, 2]], -1)
    return t, n, lo + t[:, None] * ld


def _hit_sphere(o, d, sph):
    cx, cz, rad = sph
    oc = o - np.array([cx, rad, cz])
    a = (d * d).sum(-1)
    bh = (oc * d).sum(-1)
    cc = (oc * oc).sum(-1) - rad * rad
    disc = bh * bh - a * cc
    sq = np.sqrt(np.maximum(disc, 0))
    t = (-bh - sq) / a
    ok = (disc >= 0) & (t > _EPS)
    return np.where(ok, t, _FAR)


def render(seed, height=112, width=112, info=False):
    """(image (H, W, 3) uint8, depth (H, W) float32, labels (H, W) uint8); see the module
    docstring for the conventions. info=True adds a dict: origin (3,), rays (H, W, 3) (each
    pixel centre's direction scaled to a unit component along the optical axis, so a hit is
    origin + depth * ray), forward (3,), walls [(axis "x"/"z", position)], wall_height, boxes
    [(cx, cz, half x, half y, half z, yaw)], spheres [(cx, cz, radius)] (world: y up, ground
    y = 0)."""
    rng = np.random.default_rng(seed)
    noise = _Noise(rng)
    o, d, fwd = _camera(rng, height, width)
    n_pix = d.shape[0]
    best_t = np.full(n_pix, _FAR)
    label = np.zeros(n_pix, np.uint8)
    obj = np.full(n_pix, -1)                 # index into surfaces
    surfaces = []                            # (label, material, kind, params)

    def take(t, lab, surf):
        nonlocal best_t
        closer = t < best_t
        best_t = np.where(closer, t, best_t)
        label[closer] = lab
        obj[closer] = len(surfaces)
        surfaces.append(surf)

    # ground y = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        tg = np.where(d[:, 1] < -1e-9, -o[1] / d[:, 1], _FAR)
    take(tg, 1, ("ground", _material(rng), None))
    # walls: planes with a finite height
    wall_h = rng.uniform(2.0, 9.0)
    walls = []
    if rng.random() < 0.6:
        walls.append(("z", rng.uniform(9.0, 30.0)))
    if rng.random() < 0.45:
        walls.append(("x", -rng.uniform(3.0, 9.0)))
    if rng.random() < 0.45:
        walls.append(("x", rng.uniform(3.0, 9.0)))
    for axis, pos in walls:
        k = 2 if axis == "z" else 0
        with np.errstate(divide="ignore", invalid="ignore"):
            tw = (pos - o[k]) / d[:, k]
        y = o[1] + tw * d[:, 1]
        ok = np.isfinite(tw) & (tw > _EPS) & (y >= 0) & (y <= wall_h)
        take(np.where(ok, tw, _FAR), 2, ("wall", _material(rng), (axis, pos)))
    # boxes and spheres on the ground, inside the view, not too close to the camera
    half_fov = np.radians(FOV_DEG) / 2
    occluders = []
    placed = []

    def place(radius):
        for _ in range(20):
            z = rng.uniform(2.5, 14.0)
            x = rng.uniform(-1.1, 1.1) * z * np.tan(half_fov)
            if all((x - px) ** 2 + (z - pz) ** 2 > (radius + pr) ** 2 for px, pz, pr in placed):
                placed.append((x, z, radius))
                return x, z
        return None

    for _ in range(rng.integers(0, 5)):
        hx, hy, hz = rng.uniform(0.2, 1.2), rng.uniform(0.2, 1.5), rng.uniform(0.2, 1.2)
        pos = place(max(hx, hz) * 1.42)
        if pos is None:
            continue
        box = (pos[0], pos[1], hx, hy, hz, rng.uniform(0, np.pi))
        t, _, _ = _hit_box(o, d, box)
        take(t, 3, ("box", _material(rng), box))
        occluders.append(("box", box))
    for _ in range(rng.integers(0, 5)):
        rad = rng.uniform(0.2, 1.2)
        pos = place(rad)
        if pos is None:
            continue
        sph = (pos[0], pos[1], rad)
        take(_hit_sphere(o, d, sph), 4, ("sphere", _material(rng), sph))
        occluders.append(("sphere", sph))

    sky = best_t >= _FAR
    label[sky] = 0
    depth = np.where(sky, 0.0, best_t)

    # lighting
    elev, azim = rng.uniform(0.35, 1.25), rng.uniform(-np.pi, np.pi)
    sun = np.array([np.cos(elev) * np.sin(azim), np.sin(elev), np.cos(elev) * np.cos(azim)])
    sun_col = rng.uniform(0.8, 1.0, 3) * rng.uniform(0.8, 1.2)
    ambient = rng.uniform(0.2, 0.45)
    amb_col = rng.uniform(0.8, 1.0, 3)
    zenith = rng.uniform([0.15, 0.3, 0.6], [0.45, 0.6, 0.95])
    horizon = np.clip(zenith + rng.uniform(0.2, 0.45), 0, 1)
    dn = d / np.linalg.norm(d, axis=-1, keepdims=True)
    sky_t = np.clip(dn[:, 1], 0, 1)[:, None] ** 0.6
    color = horizon[None] * (1 - sky_t) + zenith[None] * sky_t

    hit_idx = np.nonzero(~sky)[0]
    p = o[None] + depth[hit_idx, None] * d[hit_idx]
    normal = np.zeros((len(hit_idx), 3))
    albedo = np.zeros((len(hit_idx), 3))
    which = obj[hit_idx]
    for si, (kind, mat, prm) in enumerate(surfaces):
        m = which == si
        if not m.any():
            continue
        q = p[m]
        if kind == "ground":
            normal[m] = (0, 1, 0)
            albedo[m] = _texture(mat, q[:, 0], q[:, 2], noise)
        elif kind == "wall":
            axis, pos = prm
            if axis == "z":
                normal[m] = (0, 0, -1)
                albedo[m] = _texture(mat, q[:, 0], q[:, 1], noise)
            else:
                normal[m] = (-np.sign(pos), 0, 0)
                albedo[m] = _texture(mat, q[:, 2], q[:, 1], noise)
        elif kind == "box":
            _, nrm, pl = _hit_box(o, d[hit_idx[m]], prm)
            normal[m] = nrm
            # texture coordinates on the face: the two local axes across the face
            ax = np.abs(nrm[:, 1]) > 0.5
            u = np.where(ax, pl[:, 0], pl[:, 0] + pl[:, 2])
            v = np.where(ax, pl[:, 2], pl[:, 1])
            albedo[m] = _texture(mat, u * 2, v * 2, noise)
        else:
            cx, cz, rad = prm
            nrm = (q - np.array([cx, rad, cz])) / rad
            normal[m] = nrm
            lon = np.arctan2(nrm[:, 0], nrm[:, 2])
            albedo[m] = _texture(mat, lon * rad * 2, nrm[:, 1] * rad * 2, noise)
    lam = np.clip(normal @ sun, 0, None)
    # shadows: one ray per lit point towards the sun, against every box and sphere
    lit = np.ones(len(hit_idx))
    if occluders:
        cand = np.nonzero(lam > 0)[0]
        so = p[cand] + normal[cand] * 1e-3
        sd = np.broadcast_to(sun, so.shape)
        blocked = np.zeros(len(cand), bool)
        for kind, prm in occluders:
            if kind == "box":
                t, _, _ = _hit_box(so, sd, prm)
            else:
                t = _hit_sphere(so, sd, prm)
            blocked |= t < _FAR
        lit[cand[blocked]] = 0.0
    shade = ambient * amb_col[None] + (1 - ambient) * (lam * lit)[:, None] * sun_col[None]
    color[hit_idx] = albedo * shade
    color = np.clip(color, 0, 1) ** (1 / 2.2)
    color = color + rng.normal(0, 0.01, color.shape)
    image = (np.clip(color, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(height, width, 3)
    out = (image, depth.astype(np.float32).reshape(height, width), label.reshape(height, width))
    if info:
        out += (dict(origin=o, rays=d.reshape(height, width, 3), forward=fwd, walls=walls,
                     wall_height=wall_h, boxes=[p for k, p in occluders if k == "box"],
                     spheres=[p for k, p in occluders if k == "sphere"]),)
    return out


def render_batch(seeds, height=112, width=112):
    """Stacked (images (N, H, W, 3) uint8, depths (N, H, W) float32, labels (N, H, W) uint8)."""
    out = [render(int(s), height, width) for s in seeds]
    return tuple(np.stack(a) for a in zip(*out))


def normalize(images):
    """uint8 (N, H, W, 3) or (H, W, 3) RGB -> float32 NCHW / CHW with ImageNet mean and std
    (Depth Anything V2's image2tensor without its resize: the sizes here are multiples of 14)."""
    x = (np.asarray(images, np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def colorize_labels(labels):
    return PALETTE[np.asarray(labels)]


def colorize_depth(depth, vmax=None):
    """Inverse depth as 8-bit gray (near = bright); 0 (sky) stays black."""
    depth = np.asarray(depth, np.float64)
    inv = np.where(depth > 0, 1.0 / np.maximum(depth, 1e-6), 0.0)
    vmax = inv.max() if vmax is None else vmax
    return (np.clip(inv / max(vmax, 1e-12), 0, 1) * 255 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# PNG


def _chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_bytes(array):
    a = np.asarray(array)
    if a.dtype not in (np.uint8, np.uint16) or a.ndim not in (2, 3) or (
            a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError("png: need uint8/uint16 (H, W), (H, W, 3) or (H, W, 4), got %s %s"
                         % (a.dtype, a.shape))
    h, w = a.shape[:2]
    ctype = 0 if a.ndim == 2 else (2 if a.shape[2] == 3 else 6)
    bits = 8 if a.dtype == np.uint8 else 16
    rows = a.astype(">u2" if bits == 16 else np.uint8).reshape(h, -1).view(np.uint8)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows.reshape(h, -1)], 1).tobytes()
    return (b"\x89PNG\r\n\x1a\n"
            + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bits, ctype, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))


def write_png(path, array):
    with open(path, "wb") as f:
        f.write(png_bytes(array))


def read_png(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("%s: not a PNG file" % path)
    pos, idat, hdr = 8, [], None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + n
    w, h, bits, ctype, _, _, interlace = hdr
    chans = {0: 1, 2: 3, 4: 2, 6: 4}.get(ctype)
    if chans is None or bits not in (8, 16) or interlace:
        raise ValueError("%s: only 8/16-bit non-interlaced gray/RGB(A) PNGs are read" % path)
    bpp = chans * bits // 8
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, 1 + w * bpp)
    out = np.zeros((h, w * bpp), np.int64)
    prev = np.zeros(w * bpp, np.int64)
    for y in range(h):
        ft, line = raw[y, 0], raw[y, 1:].astype(np.int64)
        cur = np.zeros_like(line)
        if ft in (0, 2):
            cur = (line + (prev if ft == 2 else 0)) & 255
        else:
            for x in range(len(line)):      # sub, average, Paeth depend on the decoded left byte
                left = cur[x - bpp] if x >= bpp else 0
                up, ul = prev[x], (prev[x - bpp] if x >= bpp else 0)
                if ft == 1:
                    pred = left
                elif ft == 3:
                    pred = (left + up) // 2
                else:
                    pa, pb, pc = abs(up - ul), abs(left - ul), abs(left + up - 2 * ul)
                    pred = left if pa <= pb and pa <= pc else (up if pb <= pc else ul)
                cur[x] = (line[x] + pred) & 255
        out[y] = cur
        prev = cur
    b8 = out.astype(np.uint8)
    a = b8.view(">u2").astype(np.uint16) if bits == 16 else b8
    return a.reshape(h, w, chans) if chans > 1 else a.reshape(h, w)
