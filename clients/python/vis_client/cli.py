"""``vis`` command line: inspect models and render activations, filters and saliency maps.

    vis [--address HOST:PORT] inspect MODEL
    vis activations MODEL --images a.png b.png [--preset imagenet] --layers L1 L2 --out DIR
    vis filters MODEL --layer L --out DIR
    vis gradient MODEL --images a.png [--class K] [--rule-set guided] --out DIR
    vis models
    vis info

MODEL is a local .onnx file (uploaded first) or a model name / id known to the server.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

import numpy as np

from . import cli_attribution, cli_localization, cli_optimization
from .client import PRESETS, Client, Model
from .display import display_image, model_color
from .errors import CliError, VisError
from .tensors import CorruptStream

DEFAULT_ADDRESS = os.environ.get("VIS_ADDRESS", "127.0.0.1:50051")


# ----------------------------------------------------------------------------
# helpers


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "tensor"


def _stats(a: np.ndarray) -> str:
    if a.size == 0:
        return "empty"
    f = a.astype(np.float64)
    return f"min {f.min():.4g}  mean {f.mean():.4g}  max {f.max():.4g}"


def _shape(a) -> str:
    return str(tuple(int(d) for d in np.shape(a)))


def _stems(paths: list[str]) -> list[str]:
    stems = [_safe(Path(p).stem) for p in paths]
    if len(set(stems)) != len(stems):
        stems = [f"{i:02d}_{s}" for i, s in enumerate(stems)]
    return stems


class _Progress:
    """Progress callback: tqdm when installed, else a tiny text bar; silent off a terminal."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None
        self._plain = False

    def __call__(self, p) -> None:
        if not self.enabled or p.total <= 0:
            return
        if self._bar is None and not self._plain:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=int(p.total), desc=p.stage or "working", leave=False, file=sys.stderr)
            except ImportError:
                self._plain = True
        if self._bar is not None:
            if p.stage:
                self._bar.set_description(p.stage, refresh=False)
            self._bar.update(int(p.done) - self._bar.n)
        else:
            width = 30
            filled = int(width * min(p.done, p.total) / p.total)
            sys.stderr.write(f"\r{p.stage or 'working'} [{'#' * filled}{'.' * (width - filled)}] "
                             f"{p.done}/{p.total}")
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._plain:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _resolve_model(client: Client, ref: str) -> Model:
    p = Path(ref)
    if p.suffix.lower() == ".onnx" or p.is_file():
        if not p.is_file():
            raise CliError(f"model file not found: {p}")
        m = client.load_model(p)
        print(f"uploaded {p} as {m.name} [{m.id}]")
        return m
    return client.model(ref)


def _check_images(paths: list[str]) -> None:
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise CliError(f"image file not found: {', '.join(missing)}")


def _inputs(args):
    """What the command sends: its image files, with the other model inputs given by --tensor
    NAME=FILE.npy (metadata, a mask: a batch of rows, or one row shared by every image)."""
    if not getattr(args, "tensor", None):
        return args.images
    inputs = {"": args.images}
    for item in args.tensor:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise CliError(f"--tensor {item!r}: give NAME=FILE.npy")
        if name in inputs:
            raise CliError(f"--tensor: input {name!r} given twice")
        try:
            inputs[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CliError(f"--tensor {name}: cannot read {path!r} as a .npy array ({exc})") from None
    return inputs


def _out_dir(path: str) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


# argparse types for rendering options: checked while parsing, before any server call


def add_size(p) -> None:
    """--size H W: the images' size in the model (a model whose image size is free needs it where its
    config gives none)."""
    p.add_argument("--size", type=at_least(1), nargs=2, metavar=("H", "W"), default=None,
                   help="image size the model gets (default: the model's config or static input size; "
                        "needed for a model whose image size is free)")


def preprocessing(args):
    """The preprocess argument of a client call from --preset / --size (None: the model's config)."""
    preset, size = getattr(args, "preset", None), getattr(args, "size", None)
    if size is None:
        return preset
    return {"preset": preset, "size": list(size)} if preset else {"size": list(size)}


def at_least(lo: int):
    """argparse type: an int >= ``lo``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an int >= {lo}, got {value}")
        return value
    parse.__name__ = f"int >= {lo}"
    return parse


def opacity(text: str) -> float:
    """argparse type: a heat map opacity in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1] (0 = image only, 1 = heat map only), got {text}")
    return value


def colormap(text: str) -> str:
    """argparse type: a matplotlib colormap name (not checked without matplotlib: rendering then
    reports the missing extra)."""
    try:
        import matplotlib
    except ImportError:
        return text
    names = list(matplotlib.colormaps)
    if text not in names:
        import difflib

        close = difflib.get_close_matches(text, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; e.g. viridis, magma, jet, gray, RdBu_r"
        raise argparse.ArgumentTypeError(f"unknown matplotlib colormap {text!r}{hint}")
    return text


def _render():
    try:
        from . import render
        render._mpl()
        render._pil_image()
    except ImportError as e:
        raise CliError(str(e)) from None  # render names the [render] extra to install
    return render


# ----------------------------------------------------------------------------
# commands


def cmd_info(client: Client, args) -> None:
    info = client.server_info()
    width = max(len(k) for k in info)
    for k, v in info.items():
        if isinstance(v, list):
            v = ", ".join(map(str, v)) or "-"
        print(f"{k.ljust(width)}  {v if v != '' else '-'}")


def cmd_models(client: Client, args) -> None:
    loaded, repo = client.list_models()
    print(f"loaded ({len(loaded)}):")
    if not loaded:
        print("  (none)")
    for m in loaded:
        ins = ", ".join(f"{s.name} {s.datatype}{s.shape_str()}" for s in m.inputs)
        extra = "" if m.gradients_supported else "  [no gradients]"
        print(f"  {m.id}  {', '.join(m.names) or '-'}  ({m.source or '?'}, {m.size_bytes / 1e6:.1f} MB)  "
              f"input {ins}{extra}")
    loaded_names = {n for m in loaded for n in m.names}
    print(f"repository ({len(repo)}):")
    if not repo:
        print("  (none)")
    for name in repo:
        print(f"  {name}{'  (loaded)' if name in loaded_names else ''}")


def cmd_inspect(client: Client, args) -> None:
    model = _resolve_model(client, args.model)
    print(client.inspect(model).summary(constants=args.constants))


def cmd_activations(client: Client, args) -> None:
    _check_images(args.images)
    render = _render()
    model = _resolve_model(client, args.model)
    out = _out_dir(args.out)
    progress = _Progress()
    try:
        res = client.activations_result(model, _inputs(args), args.layers, preprocess=preprocessing(args), on_progress=progress)
    finally:
        progress.close()
    stems = _stems(args.images)
    for layer, a in res.tensors.items():
        print(f"{layer}: shape {_shape(a)}  {_stats(a)}")
        # the server's trace of the axes (a channels-last model's maps are [N, H, W, C]); else an
        # image-like channels-last tensor is recognised by its colours on the last axis
        if a.ndim == 4 and (res.layouts.get(layer) or _image_layout(a)) == "NHWC":
            a = a.transpose(0, 3, 1, 2)
        if a.ndim < 2 or a.ndim > 4 or (a.ndim == 4 and a.shape[2] * a.shape[3] == 1) or a.ndim == 2:
            # a vector per sample (logits, probabilities, pooled features): show its top entries,
            # with their label names when the answer carries them (one per entry of the vector)
            flat = a.reshape(a.shape[0], -1) if a.ndim >= 2 else a[:, None]
            names = res.labels.get(layer) or []
            if len(names) != flat.shape[1]:
                names = []
            for i in range(min(flat.shape[0], len(args.images))):
                top = np.argsort(-flat[i], kind="stable")[:5]
                print(f"  {Path(args.images[i]).name}: top " + ", ".join(
                    f"{int(k)}{f' ({names[k]})' if names and names[k] else ''}={flat[i, k]:.4g}" for k in top))
            continue
        if a.ndim == 3:
            print("  (not a 4-D feature map; no image written)")
            continue
        h, w = a.shape[2:]
        up = min(8, max(1, math.ceil(32 / max(1, min(h, w)))))
        for i, stem in enumerate(stems[:a.shape[0]]):
            path = out / f"{stem}_{_safe(layer)}.png"
            render.feature_map_grid(a[i], path, cmap=args.cmap, max_maps=args.max_maps, upscale=up)
            shown = min(a.shape[1], args.max_maps)
            print(f"  {Path(args.images[i]).name}: {path}  ({shown} of {a.shape[1]} maps, {_stats(a[i])})")


def cmd_filters(client: Client, args) -> None:
    render = _render()
    model = _resolve_model(client, args.model)
    out = _out_dir(args.out)
    f = client.filters(model, args.layer)
    w = f["weight"]
    for name, a in f.items():
        print(f"{name}: shape {_shape(a)}  {_stats(a)}")
    path = out / f"{_safe(args.layer)}_filters.png"
    if w.ndim == 4 and w.shape[1] == 3:
        bgr = model_color(model) == "BGR"
        render.rgb_filter_grid(w, path, upscale=args.upscale, bgr=bgr)
        how = (f"{w.shape[0]} {'BGR (shown as RGB)' if bgr else 'RGB'} filters, each scaled symmetrically "
               f"around 0 (grey = 0), {args.upscale} px per weight")
    elif w.ndim == 4 and w.shape[1] == 1:
        render.grey_filter_grid(w, path, upscale=args.upscale)
        how = (f"{w.shape[0]} one-channel filters, each scaled symmetrically around 0 (grey = 0), "
               f"{args.upscale} px per weight")
    elif w.ndim in (3, 4):
        render.channel_filter_grid(w, path, max_out=args.max_out, max_in=args.max_in)
        how = (f"{min(w.shape[0], args.max_out)} of {w.shape[0]} filters x {min(w.shape[1], args.max_in)} of "
               f"{w.shape[1]} input channels, grey = 0")
    elif w.ndim == 2:
        render.weight_matrix_image(w, path, upscale=max(1, min(8, 256 // max(w.shape))))
        how = "weight matrix, blue < 0 < red"
    else:
        print("  (no image for this weight shape)")
        return
    print(f"wrote {path}  ({how})")


def _image_layout(batch: np.ndarray) -> str:
    """NHWC where the last axis holds the colours (1 or 3) and axis 1 does not, as the server decides
    for a model without a layout in its config (tf2onnx's Keras models); else NCHW."""
    if batch.ndim == 4 and batch.shape[-1] in (1, 3) and batch.shape[1] not in (1, 3):
        return "NHWC"
    return "NCHW"


def cmd_gradient(client: Client, args) -> None:
    _check_images(args.images)
    render = _render()
    model = _resolve_model(client, args.model)
    out = _out_dir(args.out)
    progress = _Progress()
    try:
        g = client.gradient(model, _inputs(args), args.class_index, rule_set=args.rule_set,
                            preprocess=preprocessing(args), on_progress=progress)
    finally:
        progress.close()
    grad = g.gradient
    print(f"gradient ({args.rule_set}): shape {_shape(grad)}  {_stats(grad)}")
    print("saliency = max |gradient| over channels, colour scale 0 .. 99th percentile")
    # the preprocessed input, to overlay the map exactly where the model looked
    inputs = None
    if model.inputs:
        try:
            # the gradient's key is the image input (a model may list another input first)
            inputs = client.activations(model, _inputs(args), [next(iter(g.gradients))], preprocess=preprocessing(args))
            inputs = next(iter(inputs.values()), None)
        except VisError:
            inputs = None
    layout = str(model.config.get("input", {}).get("layout", "") or "").upper() or _image_layout(grad)
    ch_axis = -1 if layout == "NHWC" else 0
    for i, (path_in, stem) in enumerate(zip(args.images, _stems(args.images))):
        gi = grad[i]
        heat = np.abs(gi).max(axis=ch_axis) if gi.ndim == 3 else np.abs(gi)
        if inputs is not None and inputs.shape[0] > i and inputs[i].shape == gi.shape:
            img = display_image(inputs[i], model_color(model, args.preset))
        else:
            from PIL import Image
            with Image.open(path_in) as im:
                img = np.asarray(im.convert("RGB").resize((heat.shape[1], heat.shape[0])))
        path = out / f"{stem}_saliency_{_safe(args.rule_set)}.png"
        # a few pixels dominate raw gradients: clip the colour scale at the 99th percentile
        vmax = float(np.percentile(heat, 99)) if heat.size else None
        render.heatmap_overlay(img, heat, path, alpha=args.alpha, label="max |grad|",
                               vmin=0.0, vmax=vmax if vmax and vmax > 0 else None)
        what = ""
        if g.target_index is not None and g.target_index.shape[0] > i:
            idx = int(np.asarray(g.target_index[i]).ravel()[0])
            label = g.labels[i] if g.labels and len(g.labels) > i else ""
            what = f"class {idx}" + (f" ({label})" if label else "")
        if g.objective is not None and g.objective.shape[0] > i:
            what += f"{', ' if what else ''}objective {float(np.asarray(g.objective[i]).ravel()[0]):.4g}"
        print(f"  {Path(path_in).name}: {what}  -> {path}")


# ----------------------------------------------------------------------------
# entry point


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vis", description="Client for vis-service: look inside ONNX CNNs.",
                                 epilog="MODEL: a local .onnx file (uploaded) or a model name / id on the server.")
    _connection_options(ap, DEFAULT_ADDRESS, None)
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ap.set_defaults(commands=sub.choices)   # parse_args reports a stray argument with its command's usage

    p = sub.add_parser("info", help="server version, execution provider, limits")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("models", help="list loaded models and the server's model repository")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("inspect", help="print the layer table of a model")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--constants", action="store_true",
                   help="also list the nodes that depend on no input (they build weights or shapes)")
    p.set_defaults(func=cmd_inspect)

    def add_input(p):
        p.add_argument("--images", nargs="+", required=True, metavar="IMAGE", help="input image files")
        p.add_argument("--tensor", action="append", default=[], metavar="NAME=FILE.npy",
                       help="a value for another input of the model (a .npy array: one row per image, or one "
                            "row for all); repeat for several inputs")
        p.add_argument("--preset", choices=PRESETS, default=None,
                       help="preprocessing preset (default: the model's config)")
        add_size(p)

    p = sub.add_parser("activations", help="render feature maps of layers")
    p.add_argument("model", metavar="MODEL")
    add_input(p)
    p.add_argument("--layers", nargs="+", required=True, metavar="LAYER", help="tensor or node names")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--max-maps", type=at_least(1), default=64, help="channels shown per layer (default 64)")
    p.add_argument("--cmap", type=colormap, default="viridis", help="matplotlib colormap (default viridis)")
    p.set_defaults(func=cmd_activations)

    p = sub.add_parser("filters", help="render the weights of a Conv / Gemm layer")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--layer", required=True, help="a Conv / Gemm node, or its weight or output tensor")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--upscale", type=at_least(1), default=8,
                   help="pixels per weight of first-layer (1- or 3-channel) filters (default 8)")
    p.add_argument("--max-out", type=at_least(1), default=32, help="filters shown of a deeper layer (default 32)")
    p.add_argument("--max-in", type=at_least(1), default=16,
                   help="input channels shown per filter of a deeper layer (default 16)")
    p.set_defaults(func=cmd_filters)

    p = sub.add_parser("gradient", help="saliency maps (max |gradient| over channels) overlaid on the input")
    p.add_argument("model", metavar="MODEL")
    add_input(p)
    p.add_argument("--class", dest="class_index", type=int, default=None,
                   help="class index (default: each image's top-1 prediction)")
    p.add_argument("--rule-set", default="gradient",
                   help="gradient (default), guided, deconvnet, or another the server lists (vis info)")
    p.add_argument("--alpha", type=opacity, default=0.5, help="heat map opacity in [0, 1] (default 0.5)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=cmd_gradient)

    # method families add their own subcommands
    cli_attribution.register(sub, add_input)
    cli_localization.register(sub, add_input)
    cli_optimization.register(sub, add_input)
    for choice in sub._choices_actions:   # each command's --help opens with its one-line summary
        command = sub.choices[choice.dest]
        command.description = command.description or choice.help
        # --address / --timeout also after the command (vis models --address H:P); given there, they win
        _connection_options(command, argparse.SUPPRESS, argparse.SUPPRESS)
    return ap


def _connection_options(parser: argparse.ArgumentParser, address, timeout) -> None:
    parser.add_argument("--address", default=address,
                        help=f"server host:port (default {DEFAULT_ADDRESS}; env VIS_ADDRESS)")
    parser.add_argument("--timeout", type=float, default=timeout, help="per-call deadline in seconds (default: none)")


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("vis-client")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source checkout on sys.path)
        return "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed arguments; an unknown one is a usage error of its command (a typo'd flag showed the
    top-level usage, which lists only the commands)."""
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        args.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with Client(args.address, timeout=args.timeout) as client:
            args.func(client, args)
    except VisError as e:
        details = e.details or "request failed"
        if "give size [H, W]" in details:   # the API field; here the flag is the way to give it
            details += " (on the command line: --size H W)"
        if "no value for model input" in details:
            details += " (on the command line: --tensor NAME=FILE.npy)"
        print(f"error: {e.code.name}: {details}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader went away (vis inspect M | head): nothing left to say, and nobody to say it to
        try:   # stdout to /dev/null, so that the interpreter's last flush does not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except (CliError, CorruptStream, OSError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
