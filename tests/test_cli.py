"""The `vis` CLI against the real server: files written, readable summaries, error exit codes."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vis_client import cli
from vis_service.default_models import DEFAULT_MODEL_DIR


def run(server, *args) -> int:
    return cli.main(["--address", server.address, *args])


def test_info_models_inspect(server, client, capsys):
    client.model("digits")
    assert run(server, "info") == 0
    out = capsys.readouterr().out
    assert "provider" in out and ("CPUExecutionProvider" in out or "CUDAExecutionProvider" in out)
    assert run(server, "models") == 0
    assert "digits" in capsys.readouterr().out
    assert run(server, "inspect", "digits") == 0
    out = capsys.readouterr().out
    assert "block1/add" in out and "Add" in out and "global" in out  # layer table with receptive fields


def test_activations_filters_gradient_write_pngs(server, digit_images, tmp_path, capsys):
    imgs = [str(p) for p in digit_images[:2]]
    assert run(server, "activations", "digits", "--images", *imgs, "--layers", "conv1", "block1/add",
               "--out", str(tmp_path / "act")) == 0
    pngs = sorted((tmp_path / "act").glob("*.png"))
    assert len(pngs) == 4  # 2 images x 2 layers
    grid = np.asarray(Image.open(pngs[0]))
    assert grid.ndim == 3 and grid.shape[0] >= 32
    assert run(server, "filters", "digits", "--layer", "conv1", "--out", str(tmp_path / "f")) == 0
    out = capsys.readouterr().out
    assert "weight: shape (16, 1, 3, 3)" in out and "bias: shape (16,)" in out
    assert list((tmp_path / "f").glob("*.png"))
    assert run(server, "gradient", "digits", "--images", imgs[0], "--out", str(tmp_path / "g")) == 0
    assert list((tmp_path / "g").glob("*.png"))


def test_gradcam_and_occlusion_write_pngs(server, digit_images, tmp_path, capsys, every_cut):
    pytest.importorskip("matplotlib")
    imgs = [str(p) for p in digit_images[:2]]
    assert run(server, "gradcam", "digits", "--images", *imgs, "--out", str(tmp_path / "cam")) == 0
    assert len(list((tmp_path / "cam").glob("*.png"))) >= 2
    assert run(server, "occlusion", "digits", "--images", imgs[0], "--patch", "8", "--stride", "4",
               "--out", str(tmp_path / "occ")) == 0
    out = capsys.readouterr().out
    assert "occlusion: grey patch 8x8, stride 4x4, 7x7 positions" in out
    assert "recomputed per patch: " in out and "block1/add from " in out  # the digits model's local cuts
    assert {p.name.rsplit("_", 1)[-1] for p in (tmp_path / "occ").glob("*.png")} >= {"probability.png", "feature.png"}


def test_size_option_runs_a_free_size_model_on_image_files(server, client, digit_images, tmp_path, capsys):
    """--size H W: the images' size in a model whose image size is free (its config gives none);
    without it, images of one size are taken whole at that size, and images of several sizes are
    refused in one line."""
    import json

    import onnx

    pytest.importorskip("matplotlib")
    proto = onnx.load(str(DEFAULT_MODEL_DIR / "model.onnx"))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    for vi in proto.graph.output:
        vi.type.tensor_type.ClearField("shape")
    del proto.graph.value_info[:]
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    for key in ("labels", "name"):
        config.pop(key, None)
    config["input"].pop("size")
    client.load_model(proto.SerializeToString(), "digits_free_cli", config=config)
    img = str(digit_images[0])
    # without a size, images of one size are taken at it (they were refused: 'give size')
    assert run(server, "saliency", "digits_free_cli", "--images", img, "--out", str(tmp_path / "own")) == 0
    other = tmp_path / "wide.png"
    Image.open(img).resize((48, 32)).save(other)
    assert run(server, "saliency", "digits_free_cli", "--images", img, str(other), "--out", str(tmp_path / "no_size")) == 1
    err = capsys.readouterr().err
    assert "these are 32x32, 32x48; give size [H, W] (preprocess.config.size) (on the command line: --size H W)" in err, err
    assert run(server, "saliency", "digits_free_cli", "--images", img, "--size", "40", "36",
               "--out", str(tmp_path / "s")) == 0
    # the whole image at its own size: what the explicit size with a short side of that size gives
    own = client.saliency("digits_free_cli", [str(other)]).input
    given = client.saliency("digits_free_cli", [str(other)], preprocess={"size": [32, 48], "resize_short_side": 32}).input
    assert own.shape == (1, 1, 32, 48) and np.array_equal(own, given)
    pngs = list((tmp_path / "s").glob("*.png"))
    assert pngs
    assert run(server, "maximize", "digits_free_cli", "--layer", "block1/add", "--channel", "0", "--steps", "2",
               "--size", "24", "20", "--out", str(tmp_path / "m")) == 0
    assert np.asarray(Image.open(tmp_path / "m" / "block1_add_0_00.png")).shape[:2] == (24, 20)


def test_local_onnx_file_is_uploaded(server, tmp_path, capsys):
    assert run(server, "inspect", str(DEFAULT_MODEL_DIR / "model.onnx")) == 0
    assert "head/gemm" in capsys.readouterr().out


def test_inspect_leaves_out_constant_nodes_unless_asked(server, client, tmp_path, capsys):
    """A weight built in the graph (here a ConstantOfShape, as in the onnx wheel's light_* graphs)
    is not a layer: the table leaves it out and says so; --constants lists it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["wshape"], ["w"], "make_w",
                          value=numpy_helper.from_array(np.array([0.5], np.float32))),
         helper.make_node("Conv", ["x", "w"], ["y"], "conv"), helper.make_node("Relu", ["y"], ["z"], "relu")],
        "built", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [numpy_helper.from_array(np.array([2, 1, 3, 3], np.int64), "wshape")])
    path = tmp_path / "built_weights.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    assert run(server, "inspect", str(path)) == 0
    out = capsys.readouterr().out
    assert "conv" in out.split() and "make_w" not in out.split() and "(1 constant node not shown" in out
    assert "parameters: 18" in out
    assert run(server, "inspect", "built_weights", "--constants") == 0
    out = capsys.readouterr().out
    assert "make_w" in out.split() and "not shown" not in out
    client.unload("built_weights")


@pytest.mark.parametrize("args, fragment", [
    (["inspect", "no-such-model"], "NOT_FOUND"),
    (["activations", "digits", "--images", "missing.png", "--layers", "conv1", "--out", "x"], "missing.png"),
    (["filters", "digits", "--layer", "relu1", "--out", "x"], "INVALID_ARGUMENT"),
    (["maximize", "digits", "--layer", "conv1", "--neuron", "3", "3", "--steps", "2", "--out", "x"],
     "give --channel C with --neuron Y X"),
])
def test_errors_exit_1_with_one_line(server, args, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(server, *args) == 1
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("args", [["saliency", "digits", "--images", "missing.png", "--out", "x"],
                                  ["maximize", "digits", "--layer", "conv1", "--steps", "2", "--out", "x"]])
def test_errors_are_one_line_when_run_as_python_m_vis_client_cli(server, args, tmp_path):
    """Run as `python -m vis_client.cli` the module is loaded twice (__main__ and vis_client.cli): the
    subcommand modules' CliError was another class than the one main() catches, and users got a
    traceback."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "vis_client.cli", "--address", server.address, *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr and done.stderr.startswith("error: "), done.stderr


def test_gradient_command_finds_the_channels_of_a_model_without_a_layout_in_its_config():
    """`vis gradient` took the max over the image's rows of an NHWC gradient (no config: the layout
    defaulted to NCHW) and drew stripes; the layout is the server's: colours on the last axis."""
    from vis_client.cli import _image_layout

    assert _image_layout(np.zeros((2, 64, 64, 3))) == "NHWC"
    assert _image_layout(np.zeros((2, 3, 64, 64))) == "NCHW" and _image_layout(np.zeros((2, 1, 28, 28))) == "NCHW"


def test_activations_command_draws_an_nhwc_image_tensor_as_its_colour_maps(server, client, digit_images, tmp_path,
                                                                          capsys):
    """`vis activations` drew a channels-last model's input [N, H, W, 3] as 32 maps of W x 3: it is 3
    maps of H x W (the layout rule of `vis gradient`)."""
    import onnx
    from onnx import helper

    pytest.importorskip("matplotlib")
    graph = helper.make_graph([helper.make_node("Transpose", ["x"], ["xc"], perm=[0, 3, 1, 2]),
                               helper.make_node("GlobalAveragePool", ["xc"], ["p"]),
                               helper.make_node("Flatten", ["p"], ["logits"])], "nhwc",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 32, 32, 3])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None)])
    client.load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
                      .SerializeToString(), "cli_nhwc")
    assert run(server, "activations", "cli_nhwc", "--images", str(digit_images[0]), "--layers", "x",
               "--out", str(tmp_path / "a")) == 0
    assert "(3 of 3 maps" in capsys.readouterr().out


def test_activations_command_draws_a_channels_last_feature_map_as_its_channels(server, client, digit_images,
                                                                               tmp_path, capsys):
    """A ConvNeXt block's [N, H, W, C] map (4 x 4 positions, 16 channels) was drawn as 4 maps of 4 x 16;
    the server's traced layout makes it 16 maps of 4 x 4."""
    pytest.importorskip("matplotlib")
    from test_method_model_properties import convnext_like

    client.load_model(convnext_like(), "cli_convnext")
    assert run(server, "activations", "cli_convnext", "--images", str(digit_images[0]), "--layers", "fc1", "stem",
               "--size", "16", "16", "--out", str(tmp_path / "a")) == 0
    out = capsys.readouterr().out
    assert "(16 of 16 maps" in out and "(8 of 8 maps" in out, out


def test_other_model_inputs_come_from_npy_files(server, client, tmp_path, capsys):
    """A model with an image and a metadata vector: the CLI had no way to give the vector ('send images
    or tensors'); --tensor NAME=FILE.npy gives it, one row shared by every image or one per image,
    and the Python client takes image files beside arrays in one dict."""
    from test_method_output_forms import _image_and

    client.load_model(_image_and("meta", [1, 5], first=False), "cli_meta")
    images = []
    for i in range(2):
        images.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(images[-1])
    meta = np.random.default_rng(5).standard_normal((1, 5)).astype(np.float32)
    np.save(tmp_path / "meta.npy", meta)
    args = ["--images", *map(str, images), "--tensor", f"meta={tmp_path / 'meta.npy'}", "--size", "8", "8"]
    assert run(server, "saliency", "cli_meta", *args, "--out", str(tmp_path / "s")) == 0
    assert run(server, "activations", "cli_meta", *args, "--layers", "logits", "--out", str(tmp_path / "a")) == 0
    out = capsys.readouterr().out
    assert "logits: shape (2, 3)" in out, out
    assert run(server, "saliency", "cli_meta", "--images", str(images[0]), "--size", "8", "8",
               "--out", str(tmp_path / "s")) == 1
    err = capsys.readouterr().err
    assert "no value for model input(s) ['meta']" in err and "(on the command line: --tensor NAME=FILE.npy)" in err
    assert run(server, "saliency", "cli_meta", *args[:3], "--tensor", "meta", "--out", str(tmp_path / "s")) == 1
    assert "--tensor 'meta': give NAME=FILE.npy" in capsys.readouterr().err
    by_dict = client.activations("cli_meta", {"x": [str(p) for p in images], "meta": meta}, ["logits"],
                                 preprocess={"size": [8, 8]})["logits"]
    assert by_dict.shape == (2, 3) and f"{by_dict[0, 0]:.4g}" in out


def test_connection_options_after_the_command(server, capsys):
    """`vis models --address H:P` works as `vis --address H:P models` does; given after the command it wins."""
    assert cli.main(["models", "--address", server.address]) == 0
    assert "digits" in capsys.readouterr().out
    assert cli.main(["--address", "127.0.0.1:9", "--timeout", "0.01", "info", "--address", server.address,
                     "--timeout", "30"]) == 0
    assert "provider" in capsys.readouterr().out


def test_a_typo_d_flag_is_a_usage_error_of_its_command(capsys):
    """`vis gradient ... --ruleset guided` showed the top-level usage, which lists only the commands;
    the server's `serve --workrs 3` too."""
    from vis_service import cli as server_cli

    for main, argv, usage in ((cli.main, ["gradient", "digits", "--images", "a.png", "--ruleset", "guided", "--out", "o"],
                               "usage: vis gradient"),
                              (server_cli.main, ["serve", "--workrs", "3"], "usage: vis-service serve")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert usage in err and "error: unrecognized arguments: --" in err, err


def test_each_command_help_opens_with_its_summary(capsys):
    with pytest.raises(SystemExit):
        cli.main(["occlusion", "--help"])
    out = capsys.readouterr().out
    assert "occlusion sensitivity maps (Zeiler & Fergus)" in out and "--address" in out


def test_a_closed_stdout_pipe_ends_quietly(server, monkeypatch, capsys):
    """`vis inspect M | head` closes the pipe early: no error line, exit 1 (as Python does on EPIPE)."""
    import builtins
    import os as os_module

    def closed_pipe(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(builtins, "print", closed_pipe)
    monkeypatch.setattr(os_module, "dup2", lambda fd, fd2: None)   # leave the test process's stdout alone
    assert run(server, "models") == 1
    assert capsys.readouterr().err == ""


def test_missing_render_extra_is_named_once(server, digit_images, tmp_path, monkeypatch, capsys):
    from vis_client import render

    def no_matplotlib():
        raise ImportError("rendering needs matplotlib: pip install 'vis-client[render]'")

    monkeypatch.setattr(render, "_mpl", no_matplotlib)
    assert run(server, "gradient", "digits", "--images", str(digit_images[0]), "--out", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: rendering needs matplotlib: pip install 'vis-client[render]'"
