"""Model files, names and image inputs: what an exploratory session found wrong, through the real server.

Repository files are confined to their model directory (external data in subgraphs, config links),
a model's id covers its external data, a name denotes one model, and image / tensor inputs are
bounded before anything large is allocated.
"""
from __future__ import annotations

import io
import shutil

import grpc
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from PIL import Image

from conftest import assert_status, still_serving
from vis_client import VisError
from vis_service.api.servicers import Limits
from vis_service.default_models import DEFAULT_MODEL_DIR
from vis_service.gen import vis_pb2
from vis_service.server import ServerConfig, start_server

FLOAT = onnx.TensorProto.FLOAT


def _external(t: onnx.TensorProto, location: str, offset: str = "0", length: str | None = None) -> onnx.TensorProto:
    nbytes = len(t.raw_data) or np.prod(t.dims) * 4
    t.ClearField("float_data")
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", offset), ("length", length or str(nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _matmul_model(location: str, offset: str = "0", length: str | None = None, n: int = 4) -> bytes:
    w = _external(numpy_helper.from_array(np.ones((n, n), np.float32), "w"), location, offset, length)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "ext",
                          [helper.make_tensor_value_info("x", FLOAT, ["N", n])],
                          [helper.make_tensor_value_info("y", FLOAT, ["N", n])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()


def _if_model(location: str) -> bytes:
    """y = x + K, with K an external initializer of the If node's then-branch (a subgraph)."""
    k = _external(numpy_helper.from_array(np.zeros(4, np.float32), "K"), location)
    then = helper.make_graph([helper.make_node("Add", ["x", "K"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", FLOAT, ["N", 4])], [k])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", FLOAT, ["N", 4])])
    cond = numpy_helper.from_array(np.array(True), "cond")
    g = helper.make_graph([helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)], "if",
                          [helper.make_tensor_value_info("x", FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", FLOAT, ["N", 4])], [cond])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()


def _entry(repository, name: str) -> "pathlib.Path":  # noqa: F821
    d = repository / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    return d


# ---- external data ---------------------------------------------------------------------------

def test_external_data_in_a_subgraph_is_read_from_the_model_directory(client, repository, tmp_path, monkeypatch):
    """onnxruntime, given model bytes, would resolve a subgraph's external data against the server's
    working directory: the server reads it itself, from the model directory only."""
    d = _entry(repository, "ext-subgraph")
    (d / "k.bin").write_bytes(np.full(4, 7.0, np.float32).tobytes())
    (d / "model.onnx").write_bytes(_if_model("k.bin"))
    decoy = tmp_path / "cwd"
    decoy.mkdir()
    (decoy / "k.bin").write_bytes(np.full(4, 5.0, np.float32).tobytes())
    monkeypatch.chdir(decoy)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(client.activations(client.model("ext-subgraph"), x, ["y"])["y"], x + 7)
    with pytest.raises(VisError) as e:   # uploads may not use external data, in subgraphs neither
        client.load_model(_if_model("k.bin"), name="ext-subgraph-upload")
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "external data")
    still_serving(client)


def test_external_data_of_a_sparse_initializer_is_refused_in_uploads(client):
    values = _external(numpy_helper.from_array(np.ones(2, np.float32), "s_values"), "s.bin")
    indices = numpy_helper.from_array(np.array([0, 3], np.int64), "s_indices")
    sparse = helper.make_sparse_tensor(values, indices, [4])
    sparse.values.name = "s"
    g = helper.make_graph([helper.make_node("Add", ["x", "s"], ["y"])], "sparse",
                          [helper.make_tensor_value_info("x", FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", FLOAT, ["N", 4])], sparse_initializer=[sparse])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    with pytest.raises(VisError) as e:
        client.load_model(model.SerializeToString(), name="sparse-ext")
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "external data")


def test_model_id_covers_external_data(client, repository):
    """Byte-identical model.onnx files beside different weights are different models, and a
    link out of the directory is refused however many twins are loaded already."""
    model = _matmul_model("w.bin")
    for name, value in (("ext-twin-a", 1.0), ("ext-twin-b", 100.0)):
        d = _entry(repository, name)
        (d / "model.onnx").write_bytes(model)
        (d / "w.bin").write_bytes(np.full(16, value, np.float32).tobytes())
    a, b = client.model("ext-twin-a"), client.model("ext-twin-b")
    assert a.id != b.id and a.names == ["ext-twin-a"] and b.names == ["ext-twin-b"]
    x = np.ones((1, 4), np.float32)
    assert client.activations(a, x, ["y"])["y"][0, 0] == 4.0
    assert client.activations(b, x, ["y"])["y"][0, 0] == 400.0
    (repository.parent / "outside-w.bin").write_bytes(np.full(16, 1.0, np.float32).tobytes())
    d = _entry(repository, "ext-twin-link")
    (d / "model.onnx").write_bytes(model)
    (d / "w.bin").symlink_to(repository.parent / "outside-w.bin")
    with pytest.raises(VisError) as e:
        client.model("ext-twin-link")
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "outside the model directory")


def test_external_data_counts_toward_the_model_size_limit(tmp_path):
    from vis_client import Client

    repo = tmp_path / "repo"
    d = repo / "big-weights"
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(_matmul_model("w.bin", n=32))        # ~200 bytes ...
    (d / "w.bin").write_bytes(np.ones(32 * 32, np.float32).tobytes())   # ... beside 4 KiB of weights
    running = start_server(ServerConfig(port=0, model_repository=repo, limits=Limits(max_upload_bytes=2000)))
    try:
        with Client(running.address) as c:
            with pytest.raises(VisError) as e:
                c.model("big-weights")
            assert_status(e, grpc.StatusCode.RESOURCE_EXHAUSTED, "external data of 4096 bytes exceeds the",
                          "model size limit")
    finally:
        running.stop(grace=0)


def test_loaded_models_are_bounded_in_bytes(tmp_path):
    """Distinct uploads stayed loaded without bound (ten of the default 1 GiB limit outgrew the
    machine): past --max-loaded-mb an upload is RESOURCE_EXHAUSTED until another is unloaded; the
    same graph under another config shares its parse and counts once."""
    from vis_client import Client

    def model(n: int) -> bytes:
        w = numpy_helper.from_array(np.full((n, n), 1.0 / n, np.float32), "w")
        g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", FLOAT, ["N", n])],
                              [helper.make_tensor_value_info("y", FLOAT, ["N", n])], [w])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()

    running = start_server(ServerConfig(port=0, model_repository=tmp_path, loaded_model_bytes=5 << 19))
    try:
        with Client(running.address) as c:
            first, second = c.load_model(model(512), "first"), c.load_model(model(511), "second")  # ~1 MiB each
            c.load_model(model(512), "first-again", labels=[str(i) for i in range(512)])  # the same graph
            with pytest.raises(VisError) as e:
                c.load_model(model(510), "third")
            assert_status(e, grpc.StatusCode.RESOURCE_EXHAUSTED, "past the limit of 2621440 bytes", "--max-loaded-mb")
            info = c.server_info()
            assert info["max_loaded_bytes"] == 5 << 19 and info["loaded_bytes"] == first.size_bytes + second.size_bytes
            assert c.unload(second)
            assert c.load_model(model(510), "third").id
            assert c.activations(first, np.ones((1, 512), np.float32), ["y"])["y"].shape == (1, 512)
    finally:
        running.stop(grace=0)


def test_external_data_over_the_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A 3 GiB sparse data file was read whole (33 s, 9 GB of memory) before the size limit refused
    the model; so were fifteen tensors naming one 200 MiB range. The declared ranges are summed first."""
    import builtins

    from vis_service.errors import ResourceExhausted
    from vis_service.graph.loading import parse_model_files

    (tmp_path / "w.bin").write_bytes(b"")
    with open(tmp_path / "w.bin", "r+b") as fh:
        fh.truncate(3 << 30)   # sparse: no disk
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    with pytest.raises(ResourceExhausted) as e:
        parse_model_files(_matmul_model("w.bin", "0", str(3 << 30)), base_dir=tmp_path, max_model_bytes=1 << 20)
    assert "external data of 3221225472 bytes exceeds the" in str(e.value)
    assert not any(f.endswith("w.bin") for f in opened), opened


@pytest.mark.parametrize("offset,length,fragment", [("0", "abc", "must be integers"), ("-8", "64", "do not lie inside"),
                                                    ("32", "64", "do not lie inside"), ("1000000", "", "do not lie inside")])
def test_bad_external_data_ranges(client, repository, offset, length, fragment):
    d = _entry(repository, f"ext-range-{abs(hash((offset, length))) % 10000}")
    (d / "w.bin").write_bytes(np.ones(16, np.float32).tobytes())
    (d / "model.onnx").write_bytes(_matmul_model("w.bin", offset, length))
    with pytest.raises(VisError) as e:
        client.model(d.name)
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "external data of tensor 'w'", fragment)
    still_serving(client)


# ---- configs and labels -----------------------------------------------------------------------

def _digits_entry(repository, name: str):
    d = _entry(repository, name)
    shutil.copyfile(DEFAULT_MODEL_DIR / "model.onnx", d / "model.onnx")
    return d


def test_config_link_out_of_the_model_directory_is_refused_unread(client, repository):
    secret = repository.parent / "secret-config.txt"
    secret.write_text("TOPSECRET_LINE one two\n")
    for fname in ("config.pbtxt", "config.json"):
        d = _digits_entry(repository, f"cfg-link-{fname.split('.')[1]}")
        (d / fname).symlink_to(secret)
        with pytest.raises(VisError) as e:
            client.model(d.name)
        assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, fname, "link out of the model directory")
        assert "TOPSECRET" not in e.value.details
    still_serving(client)


def test_unreadable_config_and_labels_are_invalid_argument(client, repository):
    d = _digits_entry(repository, "cfg-bytes")
    (d / "config.json").write_bytes(b'{"preset": "imagenet\xff"}')
    with pytest.raises(VisError) as e:
        client.model(d.name)
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "config (config.json)", "not UTF-8")
    d = _digits_entry(repository, "labels-bytes")
    (d / "labels.txt").write_bytes(b"zero\none\xfftwo\n")
    with pytest.raises(VisError) as e:
        client.model(d.name)
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "config.labels", "not UTF-8")
    d = _digits_entry(repository, "cfg-both")
    (d / "config.json").write_text('{"preset": "imagenet"}')
    (d / "config.pbtxt").write_text('preset: "bogus"')
    with pytest.raises(VisError) as e:
        client.model(d.name)
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "both config.json and config.pbtxt")
    still_serving(client)


def test_labels_are_one_per_line(client, repository):
    """A blank line in labels.txt is a class without a name, and only a newline ends a line: both
    shifted every later class's name (blank lines were dropped; U+2028 split a label in two)."""
    d = _digits_entry(repository, "labels-lines")
    (d / "labels.txt").write_text("zero\n\ntwo\u2028two-b\r\nthree\n\n", encoding="utf-8")
    model = client.model(d.name)
    assert model.num_labels == 4
    result = client.gradient(model, np.zeros((1, 1, 32, 32), np.float32), [2])
    assert result.labels == ["two\u2028two-b"]
    still_serving(client)


def test_config_byte_order_mark_label_offset_and_a_vanished_entry(client, repository):
    """A config.json saved with a byte-order mark was 'not one JSON object'; a negative label_offset was
    taken; Load of an entry whose files were removed while it is loaded suggested its own name."""
    d = _digits_entry(repository, "cfg-bom")
    (d / "config.json").write_bytes('{"preset": "raw255"}'.encode("utf-8-sig"))
    assert client.model(d.name).config["preset"] == "raw255"
    d = _digits_entry(repository, "cfg-offset")
    (d / "config.json").write_text('{"label_offset": -5}')
    with pytest.raises(VisError) as e:
        client.model(d.name)
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "config.label_offset: must be >= 0")
    d = _digits_entry(repository, "vanishing")
    client.model(d.name)
    shutil.rmtree(d)
    with pytest.raises(VisError) as e:
        client.reload(d.name)   # Load itself (model() finds it loaded)
    assert_status(e, grpc.StatusCode.NOT_FOUND, "'vanishing'")
    assert "did you mean 'vanishing'" not in e.value.details
    still_serving(client)


def test_mean_counts_and_label_lines_are_checked_at_load(client, repository):
    """Five means for a one-channel model were taken at load and failed every image request; an
    uploaded label holding a line break was taken (a labels file could not hold it)."""
    with pytest.raises(VisError) as e:
        client.load_model((DEFAULT_MODEL_DIR / "model.onnx").read_bytes(), name="digits-means",
                          config={"input": {"mean": [0.1, 0.2, 0.3, 0.4, 0.5]}})
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "header.config.input.mean: needs 1 value (GRAY), got 5")
    with pytest.raises(VisError) as e:
        client.load_model((DEFAULT_MODEL_DIR / "model.onnx").read_bytes(), name="digits-lines",
                          labels=["zero", "one\ntwo"] + [str(i) for i in range(2, 10)])
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "header.labels[1]", "line break")
    still_serving(client)


def test_config_colour_is_checked_against_the_input_at_load(client, repository):
    """A 3-channel preset on a 1-channel model fails when the model is loaded, not on every request."""
    with pytest.raises(VisError) as e:
        client.load_model((DEFAULT_MODEL_DIR / "model.onnx").read_bytes(), name="digits-caffe", config={"preset": "caffe"})
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "header.config.input.color", "takes 1")
    d = _digits_entry(repository, "digits-rgb")
    (d / "config.json").write_text('{"input": {"color": "RGB"}}')
    with pytest.raises(VisError) as e:
        client.model(d.name)
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "config.input.color")


def test_presets_without_channel_numbers_fit_one_channel_models(client, digits, digit_images):
    """raw255 and tf name no per-channel mean/std: a greyscale model takes them (they forced RGB)."""
    raw = client.activations(digits, [digit_images[0]], ["input"], preprocess="raw255")["input"]
    tf = client.activations(digits, [digit_images[0]], ["input"], preprocess="tf")["input"]
    assert raw.shape == tf.shape == (1, 1, 32, 32) and 0 <= raw.min() and raw.max() <= 255 and raw.max() > 1
    np.testing.assert_allclose(tf, raw * (2 / 255) - 1, atol=1e-5)
    m = client.load_model((DEFAULT_MODEL_DIR / "model.onnx").read_bytes(), name="digits-raw255",
                          config={"preset": "raw255"})
    assert client.activations(m, [digit_images[0]], ["logits"])["logits"].shape == (1, 10)
    client.unload(m.id)


# ---- names --------------------------------------------------------------------------------------

def _relu_model(scale: float) -> bytes:
    s = numpy_helper.from_array(np.full(4, scale, np.float32), "s")
    g = helper.make_graph([helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                          "relu", [helper.make_tensor_value_info("x", FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", FLOAT, ["N", 4])], [s])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()


def test_a_name_denotes_one_model(client, tmp_path):
    old = client.load_model(_relu_model(2.0), name="retrained")
    new = client.load_model(_relu_model(3.0), name="retrained")
    assert new.names == ["retrained"]
    assert client.model("retrained").id == new.id
    loaded = {m.id: m.names for m in client.list_models()[0]}
    assert loaded[old.id] == [] and loaded[new.id] == ["retrained"]   # the old upload stays, by id
    assert client.activations(old.id, np.ones((1, 4), np.float32), ["y"])["y"][0, 0] == 2.0
    # a repository entry's name cannot be taken by an upload
    with pytest.raises(VisError) as e:
        client.load_model(_relu_model(4.0), name="digits")
    assert_status(e, grpc.StatusCode.ALREADY_EXISTS, "'digits'", "repository")
    assert client.model("digits").source == "repository"
    # ... but a file that happens to be called like one is uploaded unnamed (the client's default name)
    path = tmp_path / "digits.onnx"
    path.write_bytes(_relu_model(5.0))
    unnamed = client.load_model(path)
    assert unnamed.names == [] and client.model("digits").source == "repository"
    for m in (old, new, unnamed):
        client.unload(m.id)
    still_serving(client)


# ---- ops of other domains -----------------------------------------------------------------------

def test_op_of_another_domain_is_typed_and_named_as_unimplemented(client):
    """After a com.microsoft op, ONNX shape inference leaves every tensor untyped; onnxruntime
    knows them: its tensors can be exposed, and a gradient names the op that has no rule."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                           helper.make_node("Gelu", ["c"], ["a"], domain="com.microsoft", name="msgelu"),
                           helper.make_node("GlobalAveragePool", ["a"], ["y"], name="gap")], "ms",
                          [helper.make_tensor_value_info("x", FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", FLOAT, None)], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    m = client.load_model(model.SerializeToString(), name="ms-gelu")
    assert [tuple(o.shape) for o in m.outputs] == [("N", 4, 1, 1)]
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    acts = client.activations(m, x, ["a", "y"])
    np.testing.assert_allclose(acts["y"][:, :, 0, 0], acts["a"].mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
    assert not m.gradients_supported and "com.microsoft.Gelu" in m.gradients_unsupported_reason
    from vis_client import Target
    with pytest.raises(VisError) as e:
        client.gradient(m, x, Target.channel("y", 0))
    assert_status(e, grpc.StatusCode.UNIMPLEMENTED, "com.microsoft.Gelu", "'msgelu'")
    client.unload(m.id)


# ---- image and tensor inputs ------------------------------------------------------------------

def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG") if mode else Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_sixteen_bit_greyscale_png_reads_like_eight_bit(client, digits, digit_images):
    eight = np.asarray(Image.open(digit_images[3]).convert("L"))
    sixteen = _png(eight.astype(np.uint16) * 257)   # the same image at 16 bits per pixel
    assert Image.open(io.BytesIO(sixteen)).mode.startswith("I")
    a = client.activations(digits, [_png(eight)], ["logits"])["logits"]
    b = client.activations(digits, [sixteen], ["logits"])["logits"]
    np.testing.assert_array_equal(a, b)


def test_preprocessing_sizes_are_checked_before_decoding(client, digits, digit_images):
    image = [digit_images[0]]
    for preprocess, field, fragment in (
            ({"size": [100000, 100000]}, "input.preprocess.config.size", "1..8192"),
            ({"size": [64, 64]}, "input.preprocess.config.size", "differs from the [32, 32]"),
            ({"resize_short_side": -5}, "input.preprocess.config.resize_short_side", "1..8192"),
            ({"layout": "NHWC"}, "input.preprocess.config.layout", "is it NCHW?")):
        with pytest.raises(VisError) as e:
            client.activations(digits, image, ["logits"], preprocess=preprocess)
        assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, field, fragment)
    still_serving(client)


def test_long_thin_image_is_cropped_before_resizing(client, digits, monkeypatch):
    """Short side to 37 px would make a 2 x 40000 image 740000 px wide: only the crop is resampled."""
    from vis_service.models import preprocess

    sizes = []
    resize = Image.Image.resize

    def recording_resize(self, size, *args, **kwargs):
        sizes.append(size)
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    monkeypatch.setattr(preprocess, "MAX_IMAGE_PIXELS", 1_000_000)
    strip = np.tile(np.linspace(0, 255, 40000, dtype=np.float32), (2, 1)).astype(np.uint8)
    logits = client.activations(digits, [_png(strip)], ["logits"], preprocess={"resize": "center_crop"})["logits"]
    assert logits.shape == (1, 10) and np.isfinite(logits).all()
    assert sizes and max(w * h for w, h in sizes) <= 32 * 32


def test_crop_first_resize_equals_resize_then_crop(monkeypatch):
    from vis_service.models import preprocess
    from vis_service.models.config import ImageSpec

    y, x = np.mgrid[0:200, 0:900]
    img = Image.fromarray((127 + 60 * np.sin(x / 37.0) + 60 * np.cos(y / 23.0)).astype(np.uint8)).convert("RGB")
    spec = ImageSpec("x", "NCHW", "RGB", (224, 224), "center_crop", 256, (0.0, 255.0), (), (), False)
    whole = preprocess.image_to_array(img, spec)
    monkeypatch.setattr(preprocess, "MAX_IMAGE_PIXELS", 10)   # force the crop-first path
    np.testing.assert_allclose(preprocess.image_to_array(img, spec), whole, atol=1e-4)


def test_preprocessed_batch_is_bounded(client, digits, digit_images, monkeypatch):
    from vis_service.models import preprocess

    monkeypatch.setattr(preprocess, "MAX_BATCH_BYTES", 3 * 32 * 32 * 4 - 1)
    with pytest.raises(VisError) as e:
        client.activations(digits, digit_images[:3], ["logits"])
    assert_status(e, grpc.StatusCode.RESOURCE_EXHAUSTED, "3 images of 32x32")
    assert client.activations(digits, digit_images[:2], ["logits"])["logits"].shape == (2, 10)


def test_overflowing_tensor_shape_is_invalid_argument(stubs, digits):
    _, vis = stubs
    for shape in ([2 ** 62, 1, 32, 32], [2 ** 63 - 1, 1, 32, 32]):
        request = vis_pb2.ActivationsRequest(model=digits.id, layers=["logits"], input=vis_pb2.InputBatch(
            tensors=[vis_pb2.Tensor(name="input", datatype="FP32", shape=shape, raw_contents=b"\0" * 4096)]))
        with pytest.raises(grpc.RpcError) as e:
            list(vis.Activations(request, timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input.tensors[0].shape" in e.value.details() and "elements" in e.value.details()


def test_second_upload_header_is_named(stubs):
    models, _ = stubs
    header = vis_pb2.UploadRequest(header=vis_pb2.UploadHeader(name="twice"))
    with pytest.raises(grpc.RpcError) as e:
        models.Upload(iter([header, header]), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "a second header" in e.value.details()


def test_request_size_limit_is_enforced_as_configured():
    from vis_client import Client

    with pytest.raises(ValueError, match="must be in 2 MiB"):
        Limits(max_request_bytes=1 << 20)
    running = start_server(ServerConfig(port=0, model_repository=None,
                                        limits=Limits(max_request_bytes=3 << 20, max_batch=1024)))
    try:
        with Client(running.address) as c:
            assert c.server_info()["max_request_bytes"] == 3 << 20
            m = c.load_model((DEFAULT_MODEL_DIR / "model.onnx").read_bytes(), name="digits-limit")
            x = np.zeros((700, 1, 32, 32), np.float32)            # 2.9 MB: under the limit
            assert c.activations(m, x, ["logits"])["logits"].shape == (700, 10)
            with pytest.raises(VisError) as e:                     # 3.7 MB: over it (gRPC used to allow 4 MiB)
                c.activations(m, np.zeros((900, 1, 32, 32), np.float32), ["logits"])
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        running.stop(grace=0)
