"""The bad files of the bad-input battery (bench/bad_inputs.py): broken, foreign and hostile
checkpoints, malformed image arrays and folders, user-model factories that fail each way they can,
and params files with one mistake each."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


class Evil:  # a pickled object that would run code when loaded without weights_only
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def files(d: Path) -> dict:
    """The bad files the cases use, made in ``d``."""
    from texq.models import create_model

    torch.manual_seed(0)
    state = create_model("resnet8_cifar10").state_dict()
    f = {"ckpt": d / "r8.pt"}
    torch.save(state, f["ckpt"])
    f["trunc"] = d / "trunc.pt"
    f["trunc"].write_bytes(f["ckpt"].read_bytes()[:2000])
    f["random"] = d / "random.pt"
    f["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    f["pickled"] = d / "pickled.pt"
    f["pickled"].write_bytes(pickle.dumps({"state_dict": Evil()}))
    f["other"] = d / "other.pt"
    torch.save(create_model("resnet20_cifar10").state_dict(), f["other"])
    f["classes"] = d / "classes.pt"
    torch.save(create_model("resnet8_cifar100").state_dict(), f["classes"])
    for name, key, value in (("nan", "conv.weight", float("nan")), ("inf", "output.weight", float("inf")),
                             ("negvar", "bn.running_var", -1.0), ("nanvar", "bn.running_var", float("nan"))):
        s = {k: v.clone() for k, v in state.items()}
        flat_key = next(k for k in s if k.endswith(key))
        s[flat_key].view(-1)[0] = value
        f[name] = d / f"{name}.pt"
        torch.save(s, f[name])
    rng = np.random.default_rng(0)
    f["npz"] = d / "ok.npz"
    np.savez(f["npz"], x=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), y=np.arange(20) % 10)
    bad_npz = {"grey": dict(x=np.zeros((4, 32, 32), np.uint8), y=np.zeros(4, int)),
               "float": dict(x=np.zeros((4, 32, 32, 3), np.float32), y=np.zeros(4, int)),
               "chw": dict(x=np.zeros((4, 3, 32, 32), np.uint8), y=np.zeros(4, int)),
               "noy": dict(x=np.zeros((4, 32, 32, 3), np.uint8)),
               "labels": dict(x=np.zeros((4, 32, 32, 3), np.uint8), y=np.array([0, 1, 12, 3])),
               "neglabel": dict(x=np.zeros((4, 32, 32, 3), np.uint8), y=np.array([0, -1, 2, 3])),
               "empty": dict(x=np.zeros((0, 32, 32, 3), np.uint8), y=np.zeros(0, int)),
               "small": dict(x=np.zeros((4, 2, 2, 3), np.uint8), y=np.zeros(4, int)),
               "count": dict(x=np.zeros((4, 32, 32, 3), np.uint8), y=np.zeros(3, int))}
    for name, arrays in bad_npz.items():
        f[name] = d / f"{name}.npz"
        np.savez(f[name], **arrays)
    f["notnpz"] = d / "text.npz"
    f["notnpz"].write_text("not a zip")
    f["flat"] = d / "flat"  # images, no class folders
    f["flat"].mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(f["flat"] / "a.png")
    f["photos"] = d / "photos"
    for k in range(10):
        (f["photos"] / f"c{k}").mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 20 * k, np.uint8)).save(f["photos"] / f"c{k}" / "a.png")
    (f["photos"] / "c3" / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    f["nine"] = d / "nine"
    for k in range(9):
        (f["nine"] / f"c{k}").mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(f["nine"] / f"c{k}" / "a.png")
    fac = d / "factories"
    fac.mkdir()
    for name, text in {"syntax": "def build(:\n    pass\n", "badimport": "import no_such_pkg_xyz\n",
                       "raises": "def build():\n    raise RuntimeError('boom')\n",
                       "notmodule": "def build():\n    return 3\n",
                       "noinfo": "import torch\ndef build():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), "
                                 "torch.nn.BatchNorm2d(4))\n",
                       "nobn": "import torch\nfrom texq import ModelInfo\ndef build():\n    m = torch.nn.Conv2d(3, 4, 3)\n"
                               "    m.texq_info = ModelInfo('x', 10, 32, (0, 0, 0), (1, 1, 1))\n    return m\n",
                       "args": "def build(depth):\n    pass\n"}.items():
        (fac / f"{name}.py").write_text(text)
    f["fac"] = fac
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(profile="tiny", model="resnet8_cifar10", checkpoint=str(f["ckpt"]), pretrained=False,
                  data=str(f["npz"]))
    for name, edit in {"p_neg_lr": lambda p: p["finetune"].update(lr=-0.1),
                       "p_nan": lambda p: p["finetune"].update(alpha6=float("nan")),
                       "p_unknown": lambda p: p["finetune"].update(alpha7=1),
                       "p_epochs0": lambda p: p["finetune"].update(epochs=0),
                       "p_bits": lambda p: p.update(w_bits=5.5),
                       "p_ok": lambda p: None}.items():
        q = yaml.safe_load(yaml.safe_dump(params))
        edit(q)
        f[name] = d / f"{name}.yaml"
        f[name].write_text(yaml.safe_dump(q))
    f["p_dup"] = d / "p_dup.yaml"
    f["p_dup"].write_text(f["p_ok"].read_text() + "seed: 3\n")
    f["p_syntax"] = d / "p_syntax.yaml"
    f["p_syntax"].write_text("finetune: [unclosed\n")
    f["p_bytes"] = d / "p_bytes.yaml"
    f["p_bytes"].write_bytes(f["p_ok"].read_bytes() + b"note: \xff\xfe\n")
    f["p_list"] = d / "p_list.yaml"
    f["p_list"].write_text("- 1\n- 2\n")
    f["notdb"] = d / "notdb.db"
    f["notdb"].write_text("hello")
    f["afile"] = d / "afile.txt"
    f["afile"].write_text("a file")
    return f
