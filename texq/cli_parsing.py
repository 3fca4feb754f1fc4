"""The texq command's argparse pieces: a parser whose errors are one ``texq: error:`` line and
which refuses an option given twice with two values, the integer type of counts and seeds, and the
model flags texq eval and texq run share."""

from __future__ import annotations

import argparse

from texq.util.domains import COUNT_LIMIT


class _StoreOnce(argparse._StoreAction):
    """argparse's ``store`` that refuses an option given twice with two values (argparse would keep
    the last one silently: ``--w-bits 4 ... --w-bits 3`` is more likely a slip than a choice)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given", {})
        if option_string and self.dest in given and given[self.dest] != values:
            parser.error(f"{option_string} given twice ({given[self.dest]} and {values}): give it once")
        given[self.dest] = values
        super().__call__(parser, namespace, values, option_string)


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one ``texq: error:`` line (exit status 2), as texq's own, and
    an option given twice with different values refused."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", "store", _StoreOnce)
        self.register("action", None, _StoreOnce)

    def error(self, message: str):
        self.exit(2, f"texq: error: {self.prog}: {message} (see {self.prog} --help)\n")


def count(low: int, high: int = COUNT_LIMIT):
    """An argparse type: an integer >= ``low`` and < ``high`` (a count's, or a seed's, range)."""
    bound = f" and < 2**{high.bit_length() - 1}"
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if not low <= value < high:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}{bound if value >= high else ''}, "
                                             f"got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def model_flags(parser: argparse.ArgumentParser) -> None:
    """The full-precision model, its weights and the evaluation set (texq eval, texq run)."""
    parser.add_argument("--model", required=True, help="registry name, e.g. resnet20_cifar10 (see "
                        "`texq models`), or a factory my_models:build returning an nn.Module "
                        "(from . or PYTHONPATH)")
    # a factory's model without texq_info is described by these (each replaces its texq_info's)
    parser.add_argument("--num-classes", type=count(1), help="a factory's model: its class count")
    parser.add_argument("--input-size", type=count(1), help="a factory's model: its square input side (px)")
    parser.add_argument("--mean", type=float, nargs=3, metavar="M", help="a factory's model: RGB mean")
    parser.add_argument("--std", type=float, nargs=3, metavar="S", help="a factory's model: RGB std")
    parser.add_argument("--checkpoint", help="weights of the full-precision model (a state dict or "
                        "a dict holding one)")
    parser.add_argument("--pretrained", action="store_true", help="use the published weights")
    parser.add_argument("--data", required=True, help="evaluation set: a .npz file, cifar10, "
                        "cifar100 or an image folder")
