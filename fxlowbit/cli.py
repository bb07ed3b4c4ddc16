"""The ``fxlowbit`` command (also ``python -m fxlowbit``): ``demo``, ``profile`` and ``explain``.

    fxlowbit demo --quick                                   # train small models with and without lowbit
    fxlowbit profile --save                                 # measure this machine; the defaults then use it
    fxlowbit explain fxlowbit.examples:MLP --input "x=float32[64,64]"     # what lowbit does to a model

``explain MODULE:FACTORY`` imports ``MODULE`` (a dotted module name, found from the current
directory too, or a ``path/to/file.py``), calls ``FACTORY()`` (keyword arguments from ``--arg``)
and explains the model it returns on inputs made from ``--input`` specs; or the factory returns
``(model, example_inputs)``, a tuple/list of positional inputs or a dict of keyword inputs.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "parse_input_spec", "load_factory"]

EPILOG = """\
examples:
  fxlowbit demo --quick                       # ~30 s: TinyGPT and an MLP, with and without lowbit
  fxlowbit demo --help                        # the demo's own flags
  fxlowbit profile --save                     # ~1 min: the default options then plan with it
  fxlowbit profile --quick --out my.json      # ~5 s, rough: options={"profile": "my.json"}
  fxlowbit explain fxlowbit.examples:MLP --input "x=float32[64,64]"
  fxlowbit explain fxlowbit.examples:TinyGPT --arg dim=64 \\
      --input "int64[4,64]:vocab=128" --input "int64[4,64]:vocab=128" --budget 0.1
  fxlowbit explain my_models.py:make --format html --out report.html --plot memory.png

input specs (--input, once per model input, in order; NAME= makes it a keyword input):
  x=float32[4,16]                    standard normal floats
  input_ids=int64[2,32]:vocab=100    integers in [0, 100) (also :low=N,high=N)
  float32[8,3,32,32]:grad=1          an input that requires grad
"""

_SPEC = re.compile(r"^(?:(?P<name>[A-Za-z_]\w*)=)?(?P<dtype>\w+)\[(?P<dims>[\d,\s]*)\](?::(?P<opts>.*))?$")


def parse_input_spec(spec: str, seed: int | None = None):
    """``"[NAME=]DTYPE[D0,D1,...][:KEY=VALUE,...]"`` -> ``(name or None, tensor)``.

    >>> name, t = parse_input_spec("input_ids=int64[2,32]:vocab=100")
    >>> name, tuple(t.shape), str(t.dtype), int(t.max()) < 100
    ('input_ids', (2, 32), 'torch.int64', True)
    """
    import torch

    m = _SPEC.match(spec.strip())
    if m is None:
        raise ValueError(
            f"bad input spec {spec!r}: expected e.g. 'x=float32[4,16]' or 'ids=int64[2,32]:vocab=100'"
        )
    dtype = getattr(torch, m["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(
            f"bad input spec {spec!r}: unknown dtype {m['dtype']!r} (e.g. float32, bfloat16, int64)"
        )
    shape = [int(d) for d in m["dims"].split(",") if d.strip()]
    opts: dict[str, int] = {}
    for item in filter(None, (m["opts"] or "").split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in ("vocab", "low", "high", "grad") or not value.strip().lstrip("-").isdigit():
            raise ValueError(
                f"bad input spec {spec!r}: option {item!r} (valid: vocab=N, low=N, high=N, grad=0|1)"
            )
        opts[key.strip()] = int(value)
    gen = torch.Generator().manual_seed(0 if seed is None else seed)
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=gen).to(dtype).requires_grad_(bool(opts.get("grad", 0)))
    elif dtype == torch.bool:
        t = torch.rand(shape, generator=gen) < 0.5
    else:
        high = opts.get("vocab", opts.get("high", 2))
        t = torch.randint(opts.get("low", 0), high, shape, generator=gen, dtype=dtype)
    return m["name"], t


def load_factory(target: str):
    """``"pkg.module:name"`` or ``"path/to/file.py:name"`` -> the object named there."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:FACTORY (e.g. fxlowbit.examples:MLP), got {target!r}")
    if module_name.endswith(".py") or os.sep in module_name:
        spec = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot load {module_name!r}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # like python -m: modules of the current directory
        module = importlib.import_module(module_name)
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string


def _pairs(items: Sequence[str], what: str) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{what} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = _literal(value)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fxlowbit",
        description="fxlowbit: a torch.compile backend that stores saved activations in low bit widths.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="{demo,profile,explain}")
    sub.add_parser("demo", help="train small models on bundled data with and without lowbit (default)",
                   add_help=False)  # fmt: skip
    sub.add_parser("profile", help="measure this machine for the cost model (see: fxlowbit profile --help)",
                   add_help=False)  # fmt: skip
    e = sub.add_parser(
        "explain",
        help="compile a model with lowbit and report what it does to each saved tensor",
        description="Compile MODULE:FACTORY's model with lowbit, run one forward and backward, and\n"
        "print the report: per saved tensor its form, bits, bytes before/after, estimated time, why.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    arg = e.add_argument
    arg("target", metavar="MODULE:FACTORY", help="e.g. fxlowbit.examples:MLP or my_models.py:make")
    arg("--input", action="append", default=[], metavar="SPEC", help="an example input (see below)")
    arg("--arg", action="append", default=[], metavar="KEY=VALUE", help="keyword argument of FACTORY")
    arg("--budget", type=float, help="memory budget: a fraction of the saved bytes, or bytes if > 1")
    arg("--mode", choices=("memory", "balanced", "speed"), help="default budget 0.1 / 0.2 / 0.5")
    arg("--bits", type=int, choices=(8, 4, 2), help="skip the planner: every compressible tensor at B bits")
    arg("--inner", choices=("eager", "inductor"), default="eager",
        help="inner compiler (default eager: fast; inductor as in training)")  # fmt: skip
    arg("--profile", dest="hw_profile", metavar="JSON", help="hardware profile from `fxlowbit profile`")
    arg("--option", action="append", default=[], metavar="KEY=VALUE",
        help="any other backend option, e.g. min_bytes=4096 or allowed_bits=(4,8)")  # fmt: skip
    arg("--format", choices=("text", "json", "html"), default="text", help="output format (default text)")
    arg("--out", metavar="FILE", help="write the report here instead of standard output")
    arg("--plot", metavar="PNG", help="also draw memory per layer and the budget frontier here")
    arg("--dump", metavar="DIR", help="write graphs, plans and generated code here (FXLOWBIT_DUMP_DIR)")
    arg("--rich", action="store_true", help="text as a rich table (needs the rich package)")
    arg("--seed", type=int, default=0, help="seed of the model's initialisation and the inputs")
    arg("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    return p


def _build(args: argparse.Namespace):
    """(model, positional inputs, keyword inputs, backend options) from the command line."""
    import torch

    from fxlowbit.config import LowbitConfig

    options = {"inner": args.inner, **_pairs(args.option, "--option")}
    if args.budget is not None:
        options["memory_budget"] = int(args.budget) if args.budget > 1 else args.budget
    for key, value in (("mode", args.mode), ("bits", args.bits), ("profile", args.hw_profile)):
        if value is not None:
            options[key] = value
    LowbitConfig.from_options(options)  # a bad option fails here, before any model is built
    torch.manual_seed(args.seed)
    made = load_factory(args.target)(**_pairs(args.arg, "--arg"))
    model, inputs = made if isinstance(made, tuple) and len(made) == 2 and callable(made[0]) else (made, None)
    positional, keywords = [], {}
    for i, spec in enumerate(args.input):
        name, t = parse_input_spec(spec, seed=args.seed + i)
        if name:
            keywords[name] = t
        else:
            positional.append(t)
    if not args.input:
        if inputs is None:
            raise ValueError("give example inputs with --input SPEC, or make FACTORY return (model, inputs)")
        if isinstance(inputs, dict):
            keywords = dict(inputs)
        else:
            positional = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    return model, positional, keywords, options


def _explain(args: argparse.Namespace, built) -> int:
    import fxlowbit

    model, positional, keywords, options = built
    report = fxlowbit.explain(model, *positional, example_kwargs=keywords, **options)
    if args.format == "json":
        text = report.to_json()
    elif args.format == "html":
        text = report.to_html()
    else:
        text = report.to_text(rich=args.rich)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    if args.plot:
        report.plot(args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``fxlowbit``; ``demo`` when no command is given (``fxlowbit --quick``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "demo")
    if argv[0] == "demo":
        from fxlowbit.__main__ import main as demo_main

        return demo_main(argv)
    if argv[0] == "profile":
        from fxlowbit.profile import main as profile_main

        return profile_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "explain":
        parser.print_help()
        return 2
    import torch

    from fxlowbit.record import DUMP_ENV

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.dump:
        os.environ[DUMP_ENV] = args.dump
    try:
        built = _build(args)
    except (ValueError, ImportError, AttributeError, OSError, TypeError) as err:
        parser.exit(2, f"fxlowbit explain: error: {type(err).__name__}: {err}\n")
    return _explain(args, built)


if __name__ == "__main__":
    sys.exit(main())
