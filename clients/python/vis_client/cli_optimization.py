"""`vis` subcommands for optimization loops.

    vis maximize MODEL --layer L --channel C [--neuron Y X | --deepdream] --steps 256 --out DIR
    vis classmodel MODEL --class K [--param raw|fourier] --out DIR
    vis invert MODEL --images ref.png --layers a b c [--starts 2] --out DIR

Writes PNGs (final images, optional snapshots every --snapshot-every steps) and the
per-step losses as CSV; shows a progress bar with the current loss.
"""
from __future__ import annotations

from pathlib import Path


def _base():
    from . import cli  # imported lazily: cli imports this module while it loads

    return cli


def _bar(cli):
    """The CLI progress bar, with the step's loss in the description."""
    progress = cli._Progress()

    def on_step(p):
        if "loss" in p.values:
            p.stage = f"{p.stage or 'step'} loss {p.values['loss']:.4g}"
        progress(p)

    return progress, on_step


def _write_losses(path: Path, losses: dict) -> None:
    cols = list(losses)
    if not cols:
        return
    n = len(losses[cols[0]])
    with open(path, "w") as f:
        f.write("step," + ",".join(cols) + "\n")
        for i in range(n):
            f.write(f"{i + 1}," + ",".join(f"{float(losses[c][i]):.6g}" for c in cols) + "\n")


def _snapshot_writer(render, out: Path, prefix: str):
    def on_snapshot(s):
        tag = f"{prefix}_{s.layer.replace('/', '_')}" if s.layer else prefix
        for i, img in enumerate(s.images):
            render.save_png(img, out / "snapshots" / f"{tag}_{i:02d}_step{s.step:05d}.png")
    return on_snapshot


def _common_loop_args(p, steps: int, optimizer: str = "adam") -> None:
    from .cli import at_least

    p.add_argument("--steps", type=at_least(1), default=steps, help=f"optimization steps (default {steps})")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: server default)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default=None, help=f"default: {optimizer}")
    p.add_argument("--seed", type=int, default=0, help="random seed of the starting image(s) and jitter (default 0)")
    p.add_argument("--snapshot-every", type=int, default=0, metavar="K", help="also save the images every K steps")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")


def _maximize_args(p, parameterization: str = "fourier") -> None:
    from .cli import add_size

    add_size(p)
    p.add_argument("--batch", type=int, default=1, help="images optimized together (default 1)")
    p.add_argument("--param", dest="parameterization", choices=("fourier", "pixel", "raw"), default=None,
                   help=f"image parameterization (default {parameterization}): fourier (Lucid), pixel, or raw "
                        "(Simonyan: the model-space image itself)")
    p.add_argument("--no-decorrelate", action="store_true", help="turn off Lucid's colour decorrelation")
    p.add_argument("--jitter", type=int, default=None, help="max random shift in pixels per step (default 8; raw: 4)")
    p.add_argument("--scale", type=float, default=None,
                   help="max random relative zoom per step (default 0.05; raw: 0)")
    p.add_argument("--rotate", type=float, default=None, help="max random rotation in degrees (default 5; raw: 0)")
    p.add_argument("--l2", type=float, default=None, help="weight of the L2 penalty on the image (default 0; raw: 30)")
    p.add_argument("--tv", type=float, default=None, help="weight of the total-variation penalty (default 0)")
    p.add_argument("--blur-every", type=int, default=0, metavar="K",
                   help="Gaussian blur of the image every K steps (default 0 = off)")
    p.add_argument("--diversity", type=float, default=0.0,
                   help="weight of Lucid's diversity term across the batch (default 0 = off; needs --batch >= 2)")


def _maximize_kwargs(args) -> dict:
    kw = dict(steps=args.steps, lr=args.lr, batch=args.batch, decorrelate=not args.no_decorrelate,
              jitter=args.jitter, scale=args.scale, rotate=args.rotate, l2=args.l2, tv=args.tv,
              blur_every=args.blur_every, diversity=args.diversity, seed=args.seed,
              snapshot_every=args.snapshot_every, preprocess=_base().preprocessing(args))
    if args.optimizer:
        kw["optimizer"] = args.optimizer
    if args.parameterization:
        kw["parameterization"] = args.parameterization
    return kw


def _steps_run(r, requested: int) -> int:
    """Steps the server ran: the length of its per-step loss history (``requested`` without one)."""
    for column in r.losses.values():
        return len(column)
    return requested


def _save_result(cli, render, out: Path, prefix: str, r) -> None:
    for i, img in enumerate(r.images):
        path = render.save_png(img, out / f"{prefix}_{i:02d}.png")
        print(f"  image {i}: objective {float(r.objective[i]):.4g} -> {path}")
    _write_losses(out / f"{prefix}_losses.csv", r.losses)
    print(f"  losses per step -> {out / f'{prefix}_losses.csv'}")


def cmd_maximize(client, args) -> None:
    from .optimization import Objective

    cli = _base()
    render = cli._render()
    model = cli._resolve_model(client, args.model)
    out = cli._out_dir(args.out)
    if args.deepdream:
        terms = [Objective.layer_l2(args.layer)]
        what = f"deep dream {args.layer}"
    elif args.neuron:
        if args.channel is None:
            raise cli.CliError("give --channel C with --neuron Y X")
        terms = [Objective.neuron(args.layer, args.channel, args.neuron[0], args.neuron[1])]
        what = f"{args.layer} channel {args.channel} at {tuple(args.neuron)}"
    else:
        if args.channel is None:
            raise cli.CliError("give --channel C (or --deepdream)")
        terms = [Objective.channel(args.layer, args.channel)]
        what = f"{args.layer} channel {args.channel}"
    prefix = cli._safe(f"{args.layer}_{'dream' if args.deepdream else args.channel}")
    progress, on_step = _bar(cli)
    try:
        r = client.maximize(model, terms, on_step=on_step,
                            on_snapshot=_snapshot_writer(render, out, prefix) if args.snapshot_every else None,
                            **_maximize_kwargs(args))
    finally:
        progress.close()
    print(f"maximized {what} ({r.text.get('parameterization', '')}, {_steps_run(r, args.steps)} steps)")
    _save_result(cli, render, out, prefix, r)


def cmd_classmodel(client, args) -> None:
    cli = _base()
    render = cli._render()
    model = cli._resolve_model(client, args.model)
    out = cli._out_dir(args.out)
    kw = _maximize_kwargs(args)
    kw.setdefault("parameterization", "raw")
    prefix = f"class_{args.class_index}"
    progress, on_step = _bar(cli)
    try:
        r = client.class_model(model, args.class_index, on_step=on_step,
                               on_snapshot=_snapshot_writer(render, out, prefix) if args.snapshot_every else None,
                               probability=args.probability, **kw)
    finally:
        progress.close()
    print(f"class model of class {args.class_index} ({r.text.get('parameterization', '')}, "
          f"{_steps_run(r, args.steps)} steps)")
    _save_result(cli, render, out, prefix, r)


def cmd_invert(client, args) -> None:
    cli = _base()
    cli._check_images(args.images)
    if len(args.images) != 1:
        raise cli.CliError("give exactly one reference image")
    if args.tensor:
        raise cli.CliError("--tensor: inversion feeds the image input alone (models with one input)")
    render = cli._render()
    model = cli._resolve_model(client, args.model)
    out = cli._out_dir(args.out)
    kw = dict(steps=args.steps, lr=args.lr, starts=args.starts, seed=args.seed, lambda_tv=args.lambda_tv,
              lambda_alpha=args.lambda_alpha, snapshot_every=args.snapshot_every, preprocess=cli.preprocessing(args))
    if args.optimizer:
        kw["optimizer"] = args.optimizer
    progress, on_step = _bar(cli)
    try:
        inv = client.invert(model, args.images[0], args.layers, on_step=on_step,
                            on_snapshot=_snapshot_writer(render, out, "invert") if args.snapshot_every else None,
                            **kw)
    finally:
        progress.close()
    render.save_png(inv.reference, out / "reference.png")
    print(f"reference -> {out / 'reference.png'}")
    print(f"{'layer':40s} {'feature err':>12s} {'pixel err':>10s}  image")
    for li in inv.layers:
        for s, img in enumerate(li.images):
            path = render.save_png(img, out / f"invert_{cli._safe(li.layer)}_{s:02d}.png")
            print(f"{li.layer:40s} {float(li.feature_error[s]):12.4f} {float(li.pixel_error[s]):10.4f}  {path}")
        _write_losses(out / f"invert_{cli._safe(li.layer)}_losses.csv", li.losses)
    print("feature err = ||Phi(x) - Phi0|| / ||Phi0||; pixel err = ||P - P0|| / ||P0 - 127.5|| (0 = exact, ~1 = grey)")


def register(sub, add_input) -> None:
    """Add this family's subcommands to the `vis` parser."""
    p = sub.add_parser("maximize", help="activation maximization of a channel / neuron / layer (Lucid-style)")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--layer", required=True, help="tensor or node whose activation is maximized")
    p.add_argument("--channel", type=int, default=None, help="channel of the layer (required unless --deepdream)")
    p.add_argument("--neuron", type=int, nargs=2, metavar=("Y", "X"), default=None,
                   help="a single unit of the channel instead of the channel mean")
    p.add_argument("--deepdream", action="store_true", help="maximize the mean square of the whole layer")
    _common_loop_args(p, 256)
    _maximize_args(p)
    p.set_defaults(func=cmd_maximize)

    p = sub.add_parser("classmodel", help="class model visualization (Simonyan et al. 2014)")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--class", dest="class_index", type=int, required=True, help="class index to visualize")
    p.add_argument("--probability", action="store_true", help="maximize the softmax probability, not the logit")
    _common_loop_args(p, 200)
    _maximize_args(p, parameterization="raw")
    p.set_defaults(func=cmd_classmodel)

    p = sub.add_parser("invert", help="feature inversion (Mahendran & Vedaldi 2015), one image per layer")
    p.add_argument("model", metavar="MODEL")
    add_input(p)
    p.add_argument("--layers", nargs="+", default=None, metavar="LAYER", help="default: the class scores")
    p.add_argument("--starts", type=int, default=1, help="random starts per layer (default 1)")
    p.add_argument("--lambda-tv", type=float, default=None,
                   help="weight of the total-variation prior (default 5e-3; deep layers look cleaner with 0.05)")
    p.add_argument("--lambda-alpha", type=float, default=None, help="weight of the alpha-norm prior (default 1e-4)")
    _common_loop_args(p, 200, optimizer="sgd (momentum, Mahendran & Vedaldi)")
    p.set_defaults(func=cmd_invert)
