"""`vis` subcommands for CAMs and occlusion.

    vis gradcam MODEL --images cat.png --out DIR [--class K] [--layer L] [--method gradcam++]
    vis scorecam MODEL --images cat.png --out DIR [--batch 32]
    vis occlusion MODEL --images cat.png --out DIR [--patch 32 --stride 16 --fill grey]
"""
from __future__ import annotations

from pathlib import Path

from .display import display_image
from .localization import CAM_METHODS, OCCLUSION_FILLS


def _cli():
    from . import cli  # the entry module (imports this one): helpers are looked up at call time

    return cli


def _run_cam(client, args, method: str) -> None:
    cli = _cli()
    cli._check_images(args.images)
    cli._render()
    model = cli._resolve_model(client, args.model)
    out = cli._out_dir(args.out)
    progress = cli._Progress()
    try:
        cam = client.grad_cam(model, cli._inputs(args), args.class_index, layer=args.layer, method=method,
                              batch=args.batch, preprocess=cli.preprocessing(args), on_progress=progress)
    finally:
        progress.close()
    print(f"{cam.method} at layer {cam.layer}: cam {tuple(cam.cam.shape[1:])} -> heat map "
          f"{tuple(cam.heatmap.shape[1:])} (scaled to [0, 1] per image)")
    if cam.note:
        print(f"  note: {cam.note}")
    tag = cli._safe(cam.method.replace("+", "p"))  # gradcam++ -> gradcampp
    for i, (path_in, stem) in enumerate(zip(args.images, cli._stems(args.images))):
        path = out / f"{stem}_{tag}.png"
        cam.render(i, path, alpha=args.alpha)
        y, x = cam.peak(i)
        h, w = cam.heatmap.shape[1:]
        print(f"  {Path(path_in).name}: {cam.label(i)}; max at (y {y}, x {x}) of {h}x{w} "
              f"({_where(y, x, h, w)}) -> {path}")
        if cam.attribution is not None:
            import numpy as np

            a = np.abs(cam.attribution[i])
            heat = a.max(axis=0) if a.ndim == 3 and a.shape[0] in (1, 3) else a.max(axis=-1)
            gpath = out / f"{stem}_{tag}_attribution.png"
            from . import render

            render.heatmap_overlay(display_image(cam.input[i], cam.color), heat, gpath, alpha=args.alpha,
                                   label="|guided x cam|", vmin=0.0)
            print(f"    guided Grad-CAM attribution -> {gpath}")


def _where(y: int, x: int, h: int, w: int) -> str:
    rows = ("top", "middle", "bottom")[min(2, 3 * y // max(1, h))]
    cols = ("left", "centre", "right")[min(2, 3 * x // max(1, w))]
    return "centre" if rows == "middle" and cols == "centre" else f"{rows} {cols}"


def cmd_gradcam(client, args) -> None:
    _run_cam(client, args, args.method)


def cmd_scorecam(client, args) -> None:
    _run_cam(client, args, "scorecam")


def cmd_occlusion(client, args) -> None:
    cli = _cli()
    cli._check_images(args.images)
    cli._render()
    model = cli._resolve_model(client, args.model)
    out = cli._out_dir(args.out)
    progress = cli._Progress()
    try:
        occ = client.occlusion(model, cli._inputs(args), args.class_index, patch=args.patch, stride=args.stride,
                               fill=args.fill, layer=args.layer, batch=args.batch,
                               preprocess=cli.preprocessing(args), on_progress=progress)
    finally:
        progress.close()
    rows, cols = occ.probability.shape[1:]
    print(f"occlusion: {occ.fill} patch {occ.patch[0]}x{occ.patch[1]}, stride {occ.stride[0]}x{occ.stride[1]}, "
          f"{rows}x{cols} positions; feature maps of {occ.layer}")
    if occ.result.text.get("recomputed"):
        print(f"  recomputed per patch: {occ.result.text['recomputed']}")
    for i, (path_in, stem) in enumerate(zip(args.images, cli._stems(args.images))):
        paths = occ.render(i, out, stem=f"{stem}_occlusion", alpha=args.alpha)
        top, left, bottom, right = occ.most_sensitive(i)
        print(f"  {Path(path_in).name}: {occ.label(i)}  p = {float(occ.probability_unoccluded[i]):.3f} unoccluded, "
              f"{float(occ.probability[i].min()):.3f} at worst with the patch at rows {top}-{bottom}, "
              f"cols {left}-{right}; feature map {int(occ.feature_channel[i])}")
        for name, p in paths.items():
            print(f"    {name}: {p}")


def register(sub, add_input) -> None:
    """Add this family's subcommands to the `vis` parser."""
    from .cli import opacity

    def common(p, batch_default: int, batch_help: str):
        p.add_argument("model", metavar="MODEL")
        add_input(p)
        p.add_argument("--out", required=True, metavar="DIR", help="output directory")
        p.add_argument("--class", dest="class_index", type=int, default=None,
                       help="class index (default: each image's top-1 prediction)")
        p.add_argument("--layer", default=None, help="4-D feature tensor or node (default: the last feature map "
                                                     "before the global pooling)")
        p.add_argument("--batch", type=int, default=batch_default, help=batch_help)
        p.add_argument("--alpha", type=opacity, default=0.5, help="heat map opacity in [0, 1] (default 0.5)")

    p = sub.add_parser("gradcam", help="class activation maps (Grad-CAM and variants) overlaid on the input")
    common(p, 0, "Score-CAM / Ablation-CAM: inputs per run (0 = server default)")
    p.add_argument("--method", choices=CAM_METHODS, default="gradcam", help="CAM variant (default gradcam)")
    p.set_defaults(func=cmd_gradcam)

    p = sub.add_parser("scorecam", help="Score-CAM: input masked by each feature map (slow: one forward per map)")
    common(p, 0, "masked inputs per run (0 = server default)")
    p.set_defaults(func=cmd_scorecam)

    p = sub.add_parser("occlusion", help="occlusion sensitivity maps (Zeiler & Fergus)")
    common(p, 0, "occluded images per run (0 = server default: 32)")
    p.add_argument("--patch", type=int, nargs="+", default=None, metavar="N",
                   help="patch size: S or H W (default: a quarter of the smaller image side)")
    p.add_argument("--stride", type=int, nargs="+", default=None, metavar="N",
                   help="stride: S or H W (default: half the patch)")
    p.add_argument("--fill", choices=OCCLUSION_FILLS, default="grey", help="patch value (default grey)")
    p.set_defaults(func=cmd_occlusion)
