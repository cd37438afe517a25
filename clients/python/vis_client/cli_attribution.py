"""`vis` subcommands for attribution methods.

    vis saliency MODEL --images a.png --out DIR [--class K] [--signed]
    vis gradxinput MODEL --images a.png --out DIR [--class K]
    vis smoothgrad MODEL --images a.png --out DIR [--samples 25] [--noise 0.15] [--vargrad] [--seed 0]
    vis ig MODEL --images a.png --out DIR [--steps 50] [--baseline black|zero|blurred] [--blur-sigma S]
    vis guided MODEL --images a.png --out DIR [--class K]
    vis deconvnet MODEL --images a.png --layer L --out DIR [--top-k 9] [--channel C] [--crop]
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# command -> (client method, help)
COMMANDS = {
    "saliency": ("saliency", "saliency maps: max over channels of |gradient| (Simonyan et al.)"),
    "gradxinput": ("gradient_x_input", "gradient x input, summed over channels"),
    "smoothgrad": ("smoothgrad", "SmoothGrad / VarGrad: gradients averaged over noisy copies"),
    "ig": ("integrated_gradients", "Integrated Gradients from a baseline (prints the completeness gap)"),
    "guided": ("guided_backprop", "guided backpropagation"),
}


def _stats(a: np.ndarray) -> str:
    f = np.asarray(a, dtype=np.float64)
    return f"min {f.min():.4g}  mean {f.mean():.4g}  max {f.max():.4g}" if f.size else "empty"


def _run_attribution(client, args) -> None:
    from .cli import _Progress, _check_images, _inputs, _out_dir, _render, _resolve_model, _safe, _stems, preprocessing

    _check_images(args.images)
    _render()
    model = _resolve_model(client, args.model)
    out = _out_dir(args.out)
    method, _ = COMMANDS[args.command]
    kwargs = {}
    if args.command == "saliency":
        kwargs["signed"] = args.signed
    elif args.command == "smoothgrad":
        kwargs.update(samples=args.samples, noise=args.noise, vargrad=args.vargrad, seed=args.seed, batch=args.batch)
    elif args.command == "ig":
        kwargs.update(steps=args.steps, baseline=args.baseline, blur_sigma=args.blur_sigma, batch=args.batch)
    progress = _Progress()
    try:
        a = getattr(client, method)(model, _inputs(args), args.class_index, preprocess=preprocessing(args),
                                    on_progress=progress, **kwargs)
    finally:
        progress.close()
    print(f"{args.command}: map = {a.text.get('map', '?')}")
    for key in ("baseline", "rule", "noise"):
        if key in a.text:
            print(f"  {key}: {a.text[key]}")
    for i, (path_in, stem) in enumerate(zip(args.images, _stems(args.images))):
        path = out / f"{stem}_{_safe(args.command)}.png"
        a.render(i, path, cmap=args.cmap, alpha=args.alpha)
        line = f"  {Path(path_in).name}: {a.label(i) or 'target'}  map {_stats(a.map[i])}"
        if "completeness_gap" in a.extra:
            gap, delta = float(a.extra["completeness_gap"][i]), float(a.extra["delta"][i])
            rel = f" ({100 * gap / abs(delta):.2g}% of |f(x) - f(b)|)" if delta else ""
            line += f"  f(x)-f(b) {delta:.4g}  completeness gap {gap:.3g}{rel}"
        print(f"{line}  -> {path}")


def _run_deconvnet(client, args) -> None:
    from .cli import _Progress, _check_images, _inputs, _out_dir, _render, _resolve_model, _safe, _stems, preprocessing

    _check_images(args.images)
    _render()
    model = _resolve_model(client, args.model)
    out = _out_dir(args.out)
    progress = _Progress()
    try:
        d = client.deconvnet(model, _inputs(args), args.layer, top_k=args.top_k, target=args.channel,
                             crop=args.crop, rule_set=args.rule_set, preprocess=preprocessing(args),
                             on_progress=progress)
    finally:
        progress.close()
    print(f"deconvnet {d.layer} ({d.text.get('rule_set', args.rule_set)}): {d.text.get('selection', '')}")
    for i, (path_in, stem) in enumerate(zip(args.images, _stems(args.images))):
        path = out / f"{stem}_deconvnet_{_safe(d.layer)}.png"
        d.render_grid(i, path)
        units = ", ".join(f"ch {int(c)} @({int(p[0])},{int(p[1])})={float(v):.3g}"
                          for c, p, v in zip(d.channels[i], d.positions[i], d.activations[i]))
        print(f"  {Path(path_in).name}: {units}  -> {path}")


def register(sub, add_input) -> None:
    """Add this family's subcommands to the `vis` parser."""
    from .cli import colormap, opacity

    for name, (_method, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model", metavar="MODEL")
        add_input(p)
        p.add_argument("--out", required=True, metavar="DIR", help="output directory")
        p.add_argument("--class", dest="class_index", type=int, default=None,
                       help="class index (default: each image's top-1 prediction)")
        p.add_argument("--cmap", type=colormap, default="jet", help="matplotlib colormap (default jet)")
        p.add_argument("--alpha", type=opacity, default=0.5, help="heat map opacity in [0, 1] (default 0.5)")
        if name == "saliency":
            p.add_argument("--signed", action="store_true", help="signed gradient instead of |gradient|")
        if name == "smoothgrad":
            p.add_argument("--samples", type=int, default=25, help="noisy copies per image (default 25)")
            p.add_argument("--noise", type=float, default=0.15, help="sigma / input range (default 0.15)")
            p.add_argument("--vargrad", action="store_true", help="variance of the gradients (VarGrad)")
            p.add_argument("--seed", type=int, default=0, help="random seed of the noise (default 0)")
        if name == "ig":
            p.add_argument("--steps", type=int, default=50, help="path steps (default 50)")
            p.add_argument("--baseline", default="black", choices=("black", "zero", "blurred"),
                           help="black image (default), zero tensor, or the image blurred (see --blur-sigma)")
            p.add_argument("--blur-sigma", type=float, default=0.0, help="blurred baseline sigma in px")
        if name in ("smoothgrad", "ig"):
            p.add_argument("--batch", type=int, default=0, help="rows per onnxruntime run (0 = server default)")
        p.set_defaults(func=_run_attribution)

    p = sub.add_parser("deconvnet", help="deconvnet projections of a layer's strongest units (Zeiler & Fergus)")
    p.add_argument("model", metavar="MODEL")
    add_input(p)
    p.add_argument("--layer", required=True, help="a 4-D feature tensor or its node")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--top-k", type=int, default=9, help="strongest channels to project (default 9)")
    p.add_argument("--channel", type=int, default=None, help="project this channel (at its strongest position)")
    p.add_argument("--crop", action="store_true", help="show each projection cropped to its receptive field")
    p.add_argument("--rule-set", default="deconvnet",
                   help="deconvnet (default), guided, gradient, or another the server lists (vis info)")
    p.set_defaults(func=_run_deconvnet)
