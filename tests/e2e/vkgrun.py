"""`vkg run` for the end-to-end tests: inputs saved as .npy, the validation layer on, outputs read back."""
import os
import subprocess

import numpy as np


def run(vkg_bin, path, inputs, out):
    """Runs `vkg run path` into the directory out (the inputs are saved beside it) with
    VKG_VALIDATION=1; raises AssertionError with vkg's output on failure. Returns
    {output name: (array, the .npy file's bytes)} for every file in out."""
    args = [vkg_bin, "run", path, "--out", out]
    for name, arr in inputs.items():
        p = os.path.join(os.path.dirname(out), name + ".npy")
        np.save(p, arr)
        args += ["--input", "%s=%s" % (name, p)]
    r = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, VKG_VALIDATION="1"))
    if r.returncode != 0:
        raise AssertionError("vkg run failed (%d): %s%s" % (r.returncode, r.stdout, r.stderr))
    res = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".npy"):
            with open(os.path.join(out, f), "rb") as fh:
                raw = fh.read()
            res[f[:-4]] = (np.load(os.path.join(out, f)), raw)
    return res
