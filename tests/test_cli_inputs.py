"""Findings of an exploratory session on the client and `vis` CLI: layer names in Filters,
rendering options checked before any server call, --upscale for one-channel filters,
honest step counts, label names in `vis activations`, shared memory of an unclosed Client."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from conftest import assert_status, requires_shared
from vis_client import VisError, cli, render


def run(server, *args) -> int:
    return cli.main(["--address", server.address, *args])


# ----------------------------------------------------------------------------
# 1. Filters takes the layer names Inspect shows (generated ones for unnamed nodes)


@pytest.fixture(scope="module")
def unnamed(client, tmp_path_factory):
    """Conv -> Relu -> Conv, no node named (as in SqueezeNet 1.0): Inspect shows Conv_0, Relu_1, Conv_2."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(4).astype(np.float32)
    w2 = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"]), helper.make_node("Relu", ["c1"], ["r1"]),
         helper.make_node("Conv", ["r1", "w2"], ["c2"])],
        "unnamed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("c2", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")])
    path = tmp_path_factory.mktemp("unnamed") / "unnamed_convs.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    model = client.load_model(path)
    yield model, w1, b1, w2
    client.unload(model)


def test_filters_take_generated_node_names(client, unnamed):
    model, w1, b1, w2 = unnamed
    shown = [n.name for n in client.inspect(model).nodes]
    assert shown == ["Conv_0", "Relu_1", "Conv_2"]
    acts = client.activations(model, np.zeros((1, 1, 8, 8), np.float32), ["Conv_2"])  # activations take them
    assert acts["Conv_2"].shape == (1, 2, 4, 4)
    f = client.filters(model, "Conv_0")
    np.testing.assert_array_equal(f["weight"], w1)
    np.testing.assert_array_equal(f["bias"], b1)
    f = client.filters(model, "Conv_2")
    np.testing.assert_array_equal(f["weight"], w2)
    assert "bias" not in f
    np.testing.assert_array_equal(client.filters(model, "c2")["weight"], w2)  # output tensors still work


def test_filters_errors_name_the_layer_as_given(client, unnamed):
    model = unnamed[0]
    with pytest.raises(VisError) as e:
        client.filters(model, "Relu_1")
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "'Relu_1'", "Relu node")
    with pytest.raises(VisError) as e:
        client.filters(model, "Conv_9")
    assert_status(e, grpc.StatusCode.NOT_FOUND, "'Conv_9'", "'Conv_0'")


def test_vis_filters_with_a_generated_name(server, unnamed, tmp_path, capsys):
    model = unnamed[0]
    assert run(server, "filters", model.id, "--layer", "Conv_2", "--out", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "weight: shape (2, 4, 3, 3)" in out
    assert (tmp_path / "Conv_2_filters.png").is_file()


@requires_shared
def test_squeezenet_filters_by_inspect_name(server, client, tmp_path, capsys):
    model = client.model("squeezenet")
    first = client.inspect(model).nodes[0]
    assert first.name == "Conv_0" and first.op_type == "Conv"
    w = client.filters(model, "Conv_0")["weight"]
    assert w.ndim == 4 and w.shape[1] == 3
    np.testing.assert_array_equal(w, client.filters(model, first.outputs[0])["weight"])
    assert run(server, "filters", "squeezenet", "--layer", "Conv_0", "--upscale", "2", "--out", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert f"{w.shape[0]} BGR (shown as RGB) filters" in out  # a caffe-preset model
    img = np.asarray(Image.open(tmp_path / "Conv_0_filters.png"))
    rows, cols = render.grid_shape(w.shape[0])
    assert img.shape == (rows * 2 * w.shape[2] + rows - 1, cols * 2 * w.shape[3] + cols - 1, 3)


# ----------------------------------------------------------------------------
# 2. Rendering options are checked while parsing: usage error (exit 2), no traceback, no server call


@pytest.mark.parametrize("args, fragment", [
    (["activations", "digits", "--images", "IMG", "--layers", "conv1", "--cmap", "viridys"],
     "argument --cmap: unknown matplotlib colormap 'viridys'; did you mean viridis"),
    (["activations", "digits", "--images", "IMG", "--layers", "conv1", "--max-maps", "0"],
     "argument --max-maps: must be an int >= 1, got 0"),
    (["gradient", "digits", "--images", "IMG", "--alpha", "5"], "argument --alpha: must be within [0, 1]"),
    (["saliency", "digits", "--images", "IMG", "--cmap", "nope"], "argument --cmap: unknown matplotlib colormap"),
    (["smoothgrad", "digits", "--images", "IMG", "--alpha", "nan"], "argument --alpha: must be within [0, 1]"),
    (["gradcam", "digits", "--images", "IMG", "--alpha", "-0.1"], "argument --alpha: must be within [0, 1]"),
    (["occlusion", "digits", "--images", "IMG", "--alpha", "1.5"], "argument --alpha: must be within [0, 1]"),
    (["filters", "digits", "--layer", "conv1", "--upscale", "0"], "argument --upscale: must be an int >= 1"),
    (["filters", "digits", "--layer", "conv2", "--max-out", "0"], "argument --max-out: must be an int >= 1"),
    (["filters", "digits", "--layer", "conv2", "--max-in", "-1"], "argument --max-in: must be an int >= 1"),
    (["maximize", "digits", "--layer", "conv1", "--channel", "0", "--steps", "0"],
     "argument --steps: must be an int >= 1, got 0"),
    (["classmodel", "digits", "--class", "3", "--steps", "-5"], "argument --steps: must be an int >= 1"),
])
def test_bad_rendering_options_are_usage_errors_before_any_call(server, digit_images, tmp_path, monkeypatch,
                                                                capsys, args, fragment):
    pytest.importorskip("matplotlib")

    def no_client(*a, **kw):
        raise AssertionError("a Client was made: the options were not checked first")

    monkeypatch.setattr(cli, "Client", no_client)
    args = [str(digit_images[0]) if a == "IMG" else a for a in args] + ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        run(server, *args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and f"usage: vis {args[0]}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_valid_colormap_and_alpha_still_render(server, digit_images, tmp_path, capsys):
    img = str(digit_images[0])
    assert run(server, "activations", "digits", "--images", img, "--layers", "conv1", "--cmap", "magma",
               "--max-maps", "4", "--out", str(tmp_path / "a")) == 0
    assert run(server, "saliency", "digits", "--images", img, "--cmap", "gray", "--alpha", "1",
               "--out", str(tmp_path / "s")) == 0
    assert len(list((tmp_path / "a").glob("*.png"))) == 1 and len(list((tmp_path / "s").glob("*.png"))) == 1


# ----------------------------------------------------------------------------
# 3. --upscale applies to one-channel first layers too


def test_vis_filters_upscales_one_channel_filters(server, tmp_path, capsys):
    # digits conv1: 16 filters of 1 x 3 x 3 -> a 4 x 4 grid of 3k x 3k patches, 1-pixel separators
    for k in (1, 5, 8):
        out = tmp_path / str(k)
        extra = [] if k == 8 else ["--upscale", str(k)]
        assert run(server, "filters", "digits", "--layer", "conv1", "--out", str(out), *extra) == 0
        img = np.asarray(Image.open(out / "conv1_filters.png"))
        side = 4 * 3 * k + 3
        assert img.shape == (side, side, 3), (k, img.shape)
        assert f"16 one-channel filters, each scaled symmetrically around 0 (grey = 0), {k} px per weight" \
            in capsys.readouterr().out


# ----------------------------------------------------------------------------
# 4. honest output


def test_maximize_prints_the_steps_it_ran(server, tmp_path, capsys):
    assert run(server, "maximize", "digits", "--layer", "conv1", "--channel", "0", "--steps", "3",
               "--out", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "maximized conv1 channel 0 (" in out and ", 3 steps)" in out
    assert len((tmp_path / "conv1_0_losses.csv").read_text().splitlines()) == 1 + 3


def test_activations_name_the_classes_of_class_score_layers(server, client, digits, digit_images, tmp_path, capsys):
    """The answer names the entries of a class-score layer (ResultInfo.labels, from the model's
    labels), not those of other layers; the CLI prints them beside the top indices."""
    img = str(digit_images[3])  # a 3
    res = client.activations_result(digits, [img], ["logits", "conv1"])
    assert res.labels == {"logits": [str(k) for k in range(10)]}
    assert run(server, "activations", "digits", "--images", img, "--layers", "logits", "--out", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert f"{digit_images[3].name}: top 3 (3)=" in out and all(f"{k} ({k})=" in out for k in (2, 9, 5, 7))


def test_unclosed_shared_memory_client_leaves_nothing_behind(server, tmp_path):
    """A script that never closes its Client: its regions are unlinked at exit, and the resource
    tracker (which would otherwise clean up after it) has nothing to warn about."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("POSIX shared memory under /dev/shm (Linux) needed")
    script = textwrap.dedent(f"""
        import numpy as np
        from vis_client import Client

        client = Client({server.address!r}, shared_memory_bytes=4 << 20)
        x = np.zeros((20, 1, 32, 32), np.float32)      # 80 KiB: sent through the region
        acts = client.activations("digits", x, ["conv1"])  # views into the region, alive at exit
        kept = client.shared_input((4, 1, 32, 32))        # a pinned region too
        print(" ".join(client._shared.names), flush=True)
    """)
    env = dict(os.environ, PYTHONWARNINGS="default")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    regions = proc.stdout.split()
    assert len(regions) == 2
    assert not [r for r in regions if (Path("/dev/shm") / r).exists()]
    assert "leaked shared_memory" not in proc.stderr, proc.stderr
