"""``texq`` command line.

Every command prints human-readable progress on stderr and, as the last line on stdout, one JSON
object with its result. Bad input exits with status 2 and one ``texq: error: ...`` line. Installed
packages add commands through the ``texq.commands`` entry points (the pipeline's ``texq compare``
comes from ``flows``): texq imports nothing of theirs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from importlib.metadata import entry_points

from texq.cli_parsing import Parser, count, model_flags
from texq.pipeline.stages import STAGES
from texq.run.config import PROFILES
from texq.run.methods import METHODS
from texq.util.device import DEVICES
from texq.util.errors import TexqError, user_message

log = logging.getLogger("texq")
COMMANDS = "texq.commands"  # entry points adding subcommands: f(subparsers) adds its parser

def cmd_eval(args: argparse.Namespace) -> dict:
    from texq.data import gaussian_batches, load_eval_data
    from texq.eval import evaluate
    from texq.models import check_weights, create_model, load_checkpoint
    from texq.quant import FULL_PRECISION, QuantConfig, calibrate, quantize
    from texq.util.device import use_device
    from texq.util.io import check_dest, write_json

    start = time.perf_counter()
    if args.out:
        check_dest(args.out)
    model = factory_model(args)  # a factory's errors come before any work
    check_weights(args.model, args.pretrained, args.checkpoint, own_module=model is not None)
    cfg = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, per_channel=not args.per_tensor,
                      first_layer_bits=args.first_layer_bits, last_layer_bits=args.last_layer_bits,
                      fold_bn=args.fold_bn)
    device = use_device(args.device)  # float32 products on every device
    if model is None:
        model = create_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint)
    elif args.checkpoint is not None:
        load_checkpoint(model, args.checkpoint, args.model)
    info = model.texq_info
    data = load_eval_data(args.data, info)
    log.info("model %s, data %s (%d images), device %s", args.model, args.data, len(data), device)
    if not cfg.is_full_precision:
        model = quantize(model, cfg)
        log.info("quantized W%dA%d", cfg.w_bits, cfg.a_bits)
    model = model.to(device)
    calib = None
    if cfg.a_bits != FULL_PRECISION:
        calib = args.calib
        log.info("calibrating activation ranges on %d x %d Gaussian-noise images (seed %d)",
                 args.calib_batches, args.calib_batch_size, args.seed)
        calibrate(model, gaussian_batches(info, args.calib_batches, args.calib_batch_size, args.seed),
                  device=device, progress=not args.no_progress)
    result = evaluate(model, data, batch_size=args.batch_size, device=device,
                      progress=not args.no_progress, workers=args.workers)
    out = {"command": "eval", "model": args.model, "checkpoint": args.checkpoint,
           "data": args.data, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "calib": calib,
           "seed": args.seed, "device": str(device), **result.to_dict(),
           "seconds": round(time.perf_counter() - start, 2)}
    if args.out:
        write_json(args.out, out)
    return out


def parse_overrides(items: list[str]) -> dict[str, object]:
    """['finetune.alpha6=10', ...] -> {'finetune.alpha6': 10} (values parsed as YAML scalars)."""
    import yaml

    out: dict[str, object] = {}
    given: dict[str, str] = {}
    for item in items:
        try:
            item.encode("utf-8")  # argv bytes that are not UTF-8 arrive as lone surrogates
        except UnicodeEncodeError:
            shown = item.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
            raise TexqError(f"--set {shown}: not UTF-8 text (expected KEY=VALUE, e.g. "
                            "finetune.alpha6=10)") from None
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TexqError(f"--set {item!r}: expected KEY=VALUE, e.g. finetune.alpha6=10")
        if key in given:
            raise TexqError(f"--set {key} given twice ({given[key]!r} and {value!r}): give each key once")
        given[key] = value
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise TexqError(f"--set {key}={value!r}: not a value ({problem}); e.g. 0.001, true, "
                            "[0.5, 1.0] or a plain word") from None
    return out


def factory_model(args: argparse.Namespace):
    """The module a ``--model module:callable`` factory returns, described by its ``texq_info``
    with the fields given as flags replacing its own (None for a registry name). The factory's
    module is imported from the current folder (as ``python -m`` does) or PYTHONPATH."""
    from texq.models import build_factory, is_factory_spec
    from texq.models.user import REQUIRED_FIELDS

    given = {k: v for k in REQUIRED_FIELDS if (v := getattr(args, k)) is not None}
    if is_factory_spec(args.model):
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return build_factory(args.model, given)
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise TexqError(f"{flags} describe a factory's model; the registry model {args.model!r} "
                        f"carries its own")
    return None


# texq run's flags that are second spellings of config keys (RunConfig's fields): each given flag
# sets its key, an absent one leaves the key's default (the dataclass's, the profile's or --set's)
RUN_FLAGS = {"train_data": "--train-data", "method": "--method", "w_bits": "--w-bits", "a_bits": "--a-bits",
             "seed": "--seed", "device": "--device", "laws": "--no-laws", "layered_bns": "--no-layered-bns",
             "mkd": "--no-mkd"}


def run_flags(args: argparse.Namespace, overrides: dict[str, object]) -> dict[str, object]:
    """The config keys ``texq run``'s flags set (only those given); a flag and a ``--set`` of the
    same key with another value is refused in one line naming both."""
    given = {k: getattr(args, k) for k in ("train_data", "method", "w_bits", "a_bits", "seed", "device")
             if getattr(args, k) is not None}
    given.update({k: False for k in ("laws", "layered_bns", "mkd") if getattr(args, f"no_{k}")})
    for key, value in given.items():
        if key in overrides and overrides[key] != value:
            shown = RUN_FLAGS[key] + ("" if isinstance(value, bool) else f" {value}")
            raise TexqError(f"{shown} and --set {key}={overrides[key]} set one key twice: give it once")
    return given


def cmd_run(args: argparse.Namespace) -> dict:
    from texq.run.config import RunConfig
    from texq.run.runner import run
    from texq.util.io import check_dest

    check_dest(args.out, folder=True)
    model = factory_model(args)  # a factory's errors come before any work
    overrides = parse_overrides(args.set or [])
    cfg = RunConfig.for_profile(
        args.profile, info=model.texq_info if model is not None else None, overrides=overrides,
        model=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained, data=args.data,
        **run_flags(args, overrides))
    log.info("texq run: %s W%dA%d %s, profile %s, seed %d -> %s", cfg.method, cfg.w_bits,
             cfg.a_bits, cfg.model, cfg.profile, cfg.seed, args.out)
    return run(cfg, args.out, progress=not args.no_progress, model=model)


def cmd_stage(args: argparse.Namespace) -> dict:
    from texq.pipeline import read_config, run_stage

    return run_stage(args.name, read_config(args.params, args.device), args.out,
                     progress=not args.no_progress)


def cmd_models(args: argparse.Namespace) -> dict:
    from texq.models import list_models, model_info

    rows = [model_info(n).to_dict() for n in list_models()]
    for r in rows:
        log.info("%-22s %4d classes  %3dpx  %s", r["name"], r["num_classes"], r["input_size"], r["dataset"])
    return {"command": "models", "models": [r["name"] for r in rows]}


def cmd_export(args: argparse.Namespace) -> dict:
    from texq.export import export_onnx, load_run, require_onnx
    from texq.export.runtime import check_agreement, check_batches, session
    from texq.models import get_info
    from texq.util.io import check_dest

    start = time.perf_counter()
    check_dest(args.onnx)
    require_onnx()
    qmodel = load_run(args.run_dir)
    batches = check_batches(get_info(qmodel), args.check_data, args.check_images)  # before writing
    summary = export_onnx(qmodel, args.onnx, "small" if args.small else "fast", args.conv_form)
    log.info("wrote the %s file %s (%d bytes): %d quantized layers as %s, weights %s, inputs %s",
             summary.variant, summary.onnx, summary.bytes, summary.layers, summary.ops,
             summary.weight_types, summary.input_types)
    for name, why in summary.float_layers.items():
        log.info("  %s runs in float: %s", name, why)
    check = check_agreement(session(args.onnx), qmodel, batches)
    log.info("ONNX Runtime vs texq on %d %s: %.2f%% same class, max |logit diff| %.3g", check.n,
             args.check_data or "Gaussian-noise images", check.agreement, check.max_abs_logit_diff)
    return {"command": "export", "run_dir": args.run_dir, **summary.to_dict(),
            "check_data": args.check_data or "gaussian-noise", "check": check.to_dict(),
            "seconds": round(time.perf_counter() - start, 2)}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="texq", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="top-1/top-5 of a full-precision or quantized model")
    model_flags(e)
    e.add_argument("--w-bits", type=int, default=32, help="weight bits, 2..8 (32 = float)")
    e.add_argument("--a-bits", type=int, default=32, help="activation bits, 2..8 (32 = float)")
    e.add_argument("--per-tensor", action="store_true", help="one weight range per tensor")
    e.add_argument("--first-layer-bits", type=int, help="weight bits of the first layer")
    e.add_argument("--last-layer-bits", type=int, help="bits of the last layer")
    e.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into convs first")
    e.add_argument("--calib", choices=["noise"], default="noise",
                   help="images that set activation ranges: noise = N(0,1) in input space")
    e.add_argument("--calib-batches", type=count(1), default=8)
    e.add_argument("--calib-batch-size", type=count(1), default=128)
    e.add_argument("--seed", type=count(0, 2**64), default=0, help="seed of the calibration noise")
    e.add_argument("--batch-size", type=count(1), default=256)
    e.add_argument("--workers", type=count(0), default=0, help="data-loading worker processes")
    e.add_argument("--device", choices=DEVICES, default="auto")
    e.add_argument("--out", help="also write the JSON result to this file (atomically)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("run", help="quantize a model with TexQ or a baseline, fine-tune, evaluate")
    model_flags(r)
    r.add_argument("--train-data", help="real training images (method real only)")
    # each a spelling of a config key (--set KEY=VALUE), its default the key's
    r.add_argument("--method", choices=METHODS, help="method (default texq)")
    r.add_argument("--profile", choices=PROFILES, default="paper",
                   help="paper: the full protocol (GPU); quick: minutes on a CPU; tiny: tests")
    r.add_argument("--w-bits", type=int, help="weight bits, 2..8 (default 4)")
    r.add_argument("--a-bits", type=int, help="activation bits, 2..8 (default 4)")
    r.add_argument("--seed", type=int, help="seeds every random draw of the run (default 0)")
    r.add_argument("--device", choices=DEVICES, help="auto (default: CUDA when present), cpu or cuda")
    r.add_argument("--out", required=True, help="run folder (a rerun with the same --out resumes)")
    r.add_argument("--no-laws", action="store_true", help="ablation: drop L_LAWS^C (Table 3)")
    r.add_argument("--no-layered-bns", action="store_true",
                   help="ablation: plain BNS instead of L_L-BNS^C in step 1 (Table 3)")
    r.add_argument("--no-mkd", action="store_true", help="ablation: plain KD instead of mixup KD")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any config key, e.g. --set finetune.alpha6=10 (repeatable)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=cmd_run)

    st = sub.add_parser("stage", help="run one pipeline stage from params.yaml, unrecorded (dvc.yaml "
                        "runs python -m flows.stage, the same stage recorded into MLflow)")
    st.add_argument("name", choices=STAGES)
    st.add_argument("--params", default="params.yaml", help="the pipeline's parameters file")
    st.add_argument("--out", default="out/pipeline", help="folder of the stages' outputs")
    st.add_argument("--device", choices=DEVICES, default="auto")
    st.add_argument("--no-progress", action="store_true")
    st.set_defaults(func=cmd_stage)

    x = sub.add_parser("export", help="write a run's quantized model as an ONNX graph: fast "
                       "(integer kernels, the default) or small (--small)")
    x.add_argument("run_dir", help="run folder holding qmodel.pt (texq run --out, or out/pipeline/train)")
    x.add_argument("--onnx", required=True, help="the .onnx file to write (atomically)")
    x.add_argument("--check-data", help="compare ONNX Runtime with texq on this evaluation set "
                   "(.npz, cifar10, ...); default: Gaussian-noise images")
    x.add_argument("--check-images", type=count(1), default=64, help="noise images of the default check")
    x.add_argument("--small", action="store_true", help="write the smallest file instead: b-bit "
                   "codes in INT4/UINT4 with QuantizeLinear/DequantizeLinear (float kernels, slower)")
    x.add_argument("--conv-form", choices=("qlinear", "conv_integer"), default="qlinear",
                   help="fast file's quantized convolutions: QLinearConv where it reproduces "
                   "texq's codes (default), or ConvInteger everywhere (exact int32, slow on ONNX "
                   "Runtime's CPU)")
    x.set_defaults(func=cmd_export)

    m = sub.add_parser("models", help="list registered model names")
    m.set_defaults(func=cmd_models)
    for command in entry_points(group=COMMANDS):  # e.g. the pipeline extra's `texq compare`
        command.load()(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        result = args.func(args)
    except Exception as exc:
        message = user_message(exc)
        if message is None:
            raise  # a bug: its traceback
        print(f"texq: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("texq: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
